"""Task prompts (client.tasks) and token-budgeted prompt building (client.prompts) with a real tokenizer."""

from __future__ import annotations

import pytest

from client.data import HistoryItem
from client.prompts import (
    ANSWER_CUE,
    HISTORY_HEADER,
    PROFILE_HEADER,
    Prompt,
    build_prompt,
)
from common.tasks import MOVIE_TAGS, NEWS_CATEGORIES, TASKS, get_task

NEWS = "[travel, education, parents, style & beauty, entertainment, food & drink, science & technology, business, sports, healthy living, women, politics, crime, culture & arts, religion]"
TAGS = "[sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, classic, psychology, fantasy, romance, thought-provoking, social commentary, violence, true story]"

# task -> (sample item, item_text, (question, answer))
ITEM_CASES = {
    "LaMP-1": (
        {"title": "Deep nets", "abstract": "We study nets."},
        '"Deep nets"',
        ("Write a title for the following abstract of a paper: We study nets.", "Deep nets"),
    ),
    "LaMP-2N": (
        {"title": "Fed moves", "text": "Stocks fell.", "category": "business"},
        'the category for the article: "Stocks fell." is "business"',
        (
            "Which category does this article relate to among the following categories? Just answer with the "
            f"category name without further explanation. categories: {NEWS} article: Stocks fell.",
            "business",
        ),
    ),
    "LaMP-2M": (
        {"description": "A ship lost in space.", "tag": "sci-fi"},
        'the tag for the movie: "A ship lost in space." is "sci-fi"',
        (
            "Which tag does this movie relate to among the following tags? Just answer with the tag name "
            f"without further explanation. tags: {TAGS} description: A ship lost in space.",
            "sci-fi",
        ),
    ),
    "LaMP-3": (
        {"text": "Works {great}.", "score": "5"},
        '5 is the score for "Works {great}."',
        (
            "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
            "without further explanation. review: Works {great}.",
            "5",
        ),
    ),
    "LaMP-4": (
        {"title": "Storm hits coast", "text": "Heavy rain fell."},
        '"Storm hits coast" is the title for "Heavy rain fell."',
        ("Generate a headline for the following article: Heavy rain fell.", "Storm hits coast"),
    ),
    "LaMP-5": (
        {"title": "Heaps revisited", "abstract": "We revisit heaps."},
        '"Heaps revisited" is the title for "We revisit heaps."',
        ("Generate a title for the following abstract of a paper: We revisit heaps.", "Heaps revisited"),
    ),
    "LaMP-7": (
        {"text": "cant sleep again .."},
        '"cant sleep again .."',
        ("Write a tweet in your own style.", "cant sleep again .."),
    ),
    "MovieLens": (
        {"movie": "Toy Story (1995); genres: Animation, Children's, Comedy", "score": "4"},
        "Toy Story (1995); genres: Animation, Children's, Comedy; rated 4 of 5",
        (
            "Rate the movie from 1 to 5. movie: Toy Story (1995); genres: Animation, Children's, Comedy",
            "4",
        ),
    ),
}

# task -> (a query input in the dataset's format, what BM25 should search with)
QUERY_CASES = {
    "LaMP-1": (
        'For an author who has written the paper with the title "Graph Drawing", which reference is related? '
        'Just answer with [1] or [2] without explanation. [1]: "Planar grids" [2]: "Soup recipes"',
        '[1]: "Planar grids" [2]: "Soup recipes"',
    ),
    "LaMP-2N": (ITEM_CASES["LaMP-2N"][2][0], "Stocks fell."),
    "LaMP-2M": (ITEM_CASES["LaMP-2M"][2][0], "A ship lost in space."),
    "LaMP-3": (ITEM_CASES["LaMP-3"][2][0], "Works {great}."),
    "LaMP-4": ("Generate a headline for the following article: Heavy rain fell.", "Heavy rain fell."),
    "LaMP-5": ("Generate a title for the following abstract of a paper: We revisit heaps.", "We revisit heaps."),
    "LaMP-7": (
        "Paraphrase the following tweet without any explanation before or after it: cant sleep again ..",
        "cant sleep again ..",
    ),
    "MovieLens": (ITEM_CASES["MovieLens"][2][0], "Toy Story (1995); genres: Animation, Children's, Comedy"),
}


def test_cases_cover_every_task():
    assert set(ITEM_CASES) == set(TASKS) == set(QUERY_CASES)
    assert len(TASKS) == 8


@pytest.mark.parametrize("name", sorted(TASKS))
def test_item_text_and_example(name):
    task = get_task(name)
    item, text, example = ITEM_CASES[name]
    assert set(item) == set(task.item_fields)
    assert task.item_text(item) == text
    assert task.item_example(item) == example


@pytest.mark.parametrize("name", sorted(TASKS))
def test_retrieval_query_strips_instruction(name):
    task = get_task(name)
    query_input, expected = QUERY_CASES[name]
    assert task.retrieval_query(query_input) == expected
    # without the marker the input is searched as it is
    assert task.retrieval_query("no marker here") == "no marker here"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_retrieval_query_of_a_history_question_is_the_item(name):
    """Training questions made from history items search with the item's own text (LaMP-7's has none).

    LaMP-1 is the exception: its history question ("Write a title for ... paper: {abstract}") lacks the
    query marker of its test inputs, so BM25 searches with the whole question, instruction included.
    """
    task = get_task(name)
    item, _, (question, _) = ITEM_CASES[name]
    if name in ("LaMP-7", "LaMP-1"):
        assert task.retrieval_query(question) == question
    else:
        query_field = next(f for f in task.item_fields if f != task.answer_field and "{" + f + "}" in task.question_template)
        assert task.retrieval_query(question) == item[query_field]


@pytest.mark.parametrize(
    ("name", "query_input", "expected"),
    [
        # the item text itself contains the marker: only the instruction's (first) one is cut
        (
            "LaMP-5",
            "Generate a title for the following abstract of a paper: In this paper: we sort.",
            "In this paper: we sort.",
        ),
        ("LaMP-4", "Generate a headline for the following article: The article: a story.", "The article: a story."),
        ("LaMP-3", "... without further explanation. review: review: five stars", "review: five stars"),
    ],
)
def test_retrieval_query_keeps_marker_inside_item(name, query_input, expected):
    assert get_task(name).retrieval_query(query_input) == expected


def test_retrieval_fields_exclude_the_answer():
    assert {name: task.retrieval_fields for name, task in TASKS.items()} == {
        "LaMP-1": ("abstract",),
        "LaMP-2N": ("title", "text"),
        "LaMP-2M": ("description",),
        "LaMP-3": ("text",),
        "LaMP-4": ("text",),
        "LaMP-5": ("abstract",),
        "LaMP-7": ("text",),  # the only field is the answer: it is indexed anyway
        "MovieLens": ("movie",),
    }


def test_labels_and_metrics():
    assert TASKS["LaMP-2N"].labels == NEWS_CATEGORIES and len(NEWS_CATEGORIES) == 15
    assert TASKS["LaMP-2M"].labels == MOVIE_TAGS and len(MOVIE_TAGS) == 15
    assert TASKS["LaMP-1"].labels == ("[1]", "[2]")
    assert {n: t.metric for n, t in TASKS.items()} == {
        "LaMP-1": "classification", "LaMP-2N": "classification", "LaMP-2M": "classification",
        "LaMP-3": "regression", "MovieLens": "regression",
        "LaMP-4": "generation", "LaMP-5": "generation", "LaMP-7": "generation",
    }


def test_get_task_unknown():
    with pytest.raises(ValueError, match=r"unknown task 'LaMP-2'; expected one of: LaMP-1, LaMP-2N, LaMP-2M, LaMP-3, LaMP-4, LaMP-5, LaMP-7, MovieLens$"):
        get_task("LaMP-2")


# --- build_prompt with the real (SmolLM2) tokenizer of the tiny test model ------------------------------


@pytest.fixture(scope="module")
def tok():
    from client.model_build import resolve_model
    from client.model_loading import load_base

    model_dir = resolve_model("tiny-random")
    _, tokenizer = load_base(model_dir, "cpu")
    return tokenizer


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


TASK4 = get_task("LaMP-4")
QUESTION = "Generate a headline for the following article: The city council voted on Tuesday to build a new bridge."
PROFILE = "This user writes short, punchy headlines about local politics, often with a pun. " * 6
RETRIEVED = [
    HistoryItem("1", {"title": "Council backs park", "text": "The council approved a park near the river. " * 4}),
    HistoryItem("2", {"title": "Bridge plan stalls", "text": "Plans for a bridge were delayed again. " * 4}),
    HistoryItem("3", {"title": "Mayor re-elected", "text": "The mayor won a second term."}),
]


def test_full_prompt_decodes_in_order(tok):
    p = build_prompt(TASK4, tok, QUESTION, RETRIEVED, profile="  Likes puns.  ", max_tokens=2048)
    expected = (
        PROFILE_HEADER + "Likes puns.\n" + HISTORY_HEADER
        + "".join("- " + TASK4.item_text(item.fields) + "\n" for item in RETRIEVED)
        + QUESTION + ANSWER_CUE
    )
    assert tok.decode(p.ids) == expected
    assert p.ids == (
        ids(tok, PROFILE_HEADER) + ids(tok, "Likes puns.\n") + ids(tok, HISTORY_HEADER)
        + sum((ids(tok, "- " + TASK4.item_text(item.fields) + "\n") for item in RETRIEVED), [])
        + ids(tok, QUESTION + ANSWER_CUE)
    )
    assert p.question_tokens == len(ids(tok, QUESTION + ANSWER_CUE))
    assert p.profile_tokens == len(ids(tok, "Likes puns.\n"))
    assert p.history_tokens == sum(len(ids(tok, "- " + TASK4.item_text(i.fields) + "\n")) for i in RETRIEVED)
    assert len(p.ids) == len(ids(tok, PROFILE_HEADER)) + p.profile_tokens + len(ids(tok, HISTORY_HEADER)) + p.history_tokens + p.question_tokens


def test_question_only(tok):
    p = build_prompt(TASK4, tok, QUESTION, max_tokens=512)
    assert p == Prompt(ids(tok, QUESTION + ANSWER_CUE), len(ids(tok, QUESTION + ANSWER_CUE)), 0, 0)
    assert tok.decode(p.ids) == QUESTION + ANSWER_CUE


@pytest.mark.parametrize("max_tokens", [0, 1, 5, 20])
def test_question_never_truncated(tok, max_tokens):
    question_ids = ids(tok, QUESTION + ANSWER_CUE)
    assert len(question_ids) > max_tokens
    p = build_prompt(TASK4, tok, QUESTION, RETRIEVED, profile=PROFILE, max_tokens=max_tokens)
    assert p.ids == question_ids
    assert (p.question_tokens, p.profile_tokens, p.history_tokens) == (len(question_ids), 0, 0)


def test_budget_respected_and_question_intact_at_every_budget(tok):
    question_ids = ids(tok, QUESTION + ANSWER_CUE)
    full = build_prompt(TASK4, tok, QUESTION, RETRIEVED, profile=PROFILE, max_tokens=100_000)
    profile_header, history_header = ids(tok, PROFILE_HEADER), ids(tok, HISTORY_HEADER)
    saw_both = 0
    for max_tokens in range(len(question_ids), len(full.ids) + 5, 3):
        p = build_prompt(TASK4, tok, QUESTION, RETRIEVED, profile=PROFILE, max_tokens=max_tokens)
        assert len(p.ids) <= max_tokens
        assert p.ids[-len(question_ids):] == question_ids
        assert p.question_tokens == len(question_ids)
        parts = p.ids[: -len(question_ids)]
        expected_len = p.profile_tokens + p.history_tokens
        expected_len += len(profile_header) if p.profile_tokens else 0
        expected_len += len(history_header) if p.history_tokens else 0
        assert len(parts) == expected_len
        if p.profile_tokens:
            assert parts[: len(profile_header)] == profile_header
            body = parts[len(profile_header) : len(profile_header) + p.profile_tokens]
            assert body == ids(tok, PROFILE.strip() + "\n")[: p.profile_tokens]  # a prefix of the profile
        if p.history_tokens:
            start = len(profile_header) + p.profile_tokens if p.profile_tokens else 0
            assert parts[start : start + len(history_header)] == history_header
            saw_both += bool(p.profile_tokens)
    assert saw_both > 10
    # with room for everything nothing is cut
    assert full.profile_tokens == len(ids(tok, PROFILE.strip() + "\n"))


def test_truncation_shares(tok):
    """Profile gets half the room left by the question; each retrieved item an equal share of the rest."""
    question_ids = ids(tok, QUESTION + ANSWER_CUE)
    profile_header, history_header = ids(tok, PROFILE_HEADER), ids(tok, HISTORY_HEADER)
    budget = 120
    p = build_prompt(TASK4, tok, QUESTION, RETRIEVED, profile=PROFILE, max_tokens=len(question_ids) + budget)
    assert p.profile_tokens == budget // 2 - len(profile_header)
    rest = budget - budget // 2
    per_item = (rest - len(history_header)) // len(RETRIEVED)
    item_ids = [ids(tok, "- " + TASK4.item_text(i.fields) + "\n") for i in RETRIEVED]
    assert p.history_tokens == sum(min(per_item, len(x)) for x in item_ids)
    # items appear in the retrieved order, each cut to its share
    history = p.ids[len(profile_header) + p.profile_tokens + len(history_header) : -len(question_ids)]
    assert history == sum((x[:per_item] for x in item_ids), [])
    decoded = tok.decode(p.ids)
    assert decoded.startswith(PROFILE_HEADER + "This user writes short")
    assert decoded.index(PROFILE_HEADER) < decoded.index(HISTORY_HEADER) < decoded.index("- \"Council backs park\"")
    assert decoded.index("- \"Council backs park\"") < decoded.index("- \"Bridge plan stalls\"") < decoded.index("- \"Mayor re-elected\"")
    assert decoded.endswith(QUESTION + ANSWER_CUE)


def test_profile_alone_uses_the_whole_budget(tok):
    question_ids = ids(tok, QUESTION + ANSWER_CUE)
    header = ids(tok, PROFILE_HEADER)
    p = build_prompt(TASK4, tok, QUESTION, profile=PROFILE, max_tokens=len(question_ids) + 40)
    assert p.profile_tokens == 40 - len(header) and p.history_tokens == 0
    assert len(p.ids) == len(question_ids) + 40
    # a budget too small for the header leaves the profile out entirely
    p = build_prompt(TASK4, tok, QUESTION, profile=PROFILE, max_tokens=len(question_ids) + len(header))
    assert p.ids == question_ids and p.profile_tokens == 0


def test_history_alone_and_too_many_items(tok):
    question_ids = ids(tok, QUESTION + ANSWER_CUE)
    header = ids(tok, HISTORY_HEADER)
    p = build_prompt(TASK4, tok, QUESTION, RETRIEVED, max_tokens=len(question_ids) + len(header) + 30)
    assert p.profile_tokens == 0 and p.history_tokens == 30  # 10 tokens per item, all items are longer
    assert p.ids[: len(header)] == header and len(p.ids) == len(question_ids) + len(header) + 30
    # fewer tokens than items: no item fits, the history part (and its header) is dropped
    p = build_prompt(TASK4, tok, QUESTION, RETRIEVED, max_tokens=len(question_ids) + len(header) + 2)
    assert p.ids == question_ids and p.history_tokens == 0
