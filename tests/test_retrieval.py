"""BM25 retrieval over one user's history (client.retrieval), with the real rank_bm25."""

from __future__ import annotations

import pytest
from rank_bm25 import BM25Okapi

from client.data import HistoryItem
from client.retrieval import HistoryRetriever, tokenize
from common.tasks import get_task

TWEETS = get_task("LaMP-7")
PREFIX = "Paraphrase the following tweet without any explanation before or after it: "

TEXTS = [
    "the weather was sunny at the beach today",  # 0
    "coffee first then the world",  # 1
    "dragon castle knight story tonight",  # 2: all three query words
    "my cat ignores me again",  # 3
    "new phone who dis",  # 4
    "castle knight visit this weekend",  # 5: two of them
    "knight chess opening practice",  # 6: one
    "cant sleep again",  # 7
]
HISTORY = [HistoryItem(str(i), {"text": t}) for i, t in enumerate(TEXTS)]
QUERY = PREFIX + "dragon castle knight"


def ids(items: list[HistoryItem]) -> list[str]:
    return [h.id for h in items]


def test_tokenize():
    assert tokenize("Hello, World! It's 3pm -- café_2") == ["hello", "world", "it", "s", "3pm", "café_2"]


def test_best_first():
    r = HistoryRetriever(TWEETS, HISTORY)
    assert ids(r.top_k(QUERY, 1)) == ["2"]
    assert ids(r.top_k(QUERY, 3)) == ["2", "5", "6"]
    # everything: the matches best first, then the non-matching items (all tied at 0) newest first
    assert ids(r.top_k(QUERY, 100)) == ["2", "5", "6", "7", "4", "3", "1", "0"]


def test_query_instruction_is_not_searched():
    """The instruction's words ("the", "after", ...) would favour item 0, which has "the" twice."""
    r = HistoryRetriever(TWEETS, HISTORY)
    assert ids(r.top_k(PREFIX + "sleepless again", 2)) == ["7", "3"]
    assert ids(r.top_k(PREFIX + "the", 2)) == ["0", "1"]


def test_matches_rank_bm25_directly():
    r = HistoryRetriever(TWEETS, HISTORY)
    scores = BM25Okapi([t.split() for t in TEXTS]).get_scores(["dragon", "castle", "knight"])
    expected = sorted(range(len(TEXTS)), key=lambda i: (-scores[i], -i))
    assert ids(r.top_k(QUERY, len(TEXTS))) == [str(i) for i in expected]
    assert scores[2] > scores[5] > scores[6] > 0


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_before_never_returns_item_i_or_later(k):
    r = HistoryRetriever(TWEETS, HISTORY)
    for i in range(len(HISTORY) + 3):
        visible = min(i, len(HISTORY))
        got = r.top_k(QUERY, k, before=i)
        positions = [int(h.id) for h in got]
        assert all(p < i for p in positions), (i, positions)
        assert len(got) == min(k, visible)
        assert len(set(positions)) == len(positions)
        if visible:
            # the index is built over the visible items only (no IDF from later items)
            scores = BM25Okapi([t.split() for t in TEXTS[:visible]]).get_scores(["dragon", "castle", "knight"])
            expected = sorted(range(visible), key=lambda j: (-scores[j], -j))[:k]
            assert positions == expected, (i, positions, expected)
    # once item 2 is visible it is the best match
    assert ids(r.top_k(QUERY, 1, before=3)) == ["2"]
    assert ids(r.top_k(QUERY, 2, before=6)) == ["2", "5"]


def test_k_zero_and_empty():
    r = HistoryRetriever(TWEETS, HISTORY)
    assert r.top_k(QUERY, 0) == []
    assert r.top_k(QUERY, -1) == []
    assert r.top_k(QUERY, 3, before=0) == []
    assert HistoryRetriever(TWEETS, []).top_k(QUERY, 3) == []
    assert HistoryRetriever(TWEETS, []).top_k(QUERY, 3, before=5) == []


def test_ties_go_to_the_more_recent_item():
    same = [HistoryItem(f"s{i}", {"text": "exactly the same words"}) for i in range(5)]
    r = HistoryRetriever(TWEETS, same)
    assert ids(r.top_k(PREFIX + "same words", 3)) == ["s4", "s3", "s2"]
    assert ids(r.top_k(PREFIX + "same words", 3, before=2)) == ["s1", "s0"]
    # a query with no word tokens scores every item 0: newest first
    r = HistoryRetriever(TWEETS, HISTORY)
    assert ids(r.top_k(PREFIX + "!!! ...", 3)) == ["7", "6", "5"]
    assert ids(r.top_k(PREFIX + "zebra", 2, before=4)) == ["3", "2"]
    # two equally good matches among others: the later one first
    mixed = HISTORY + [HistoryItem("8", {"text": "castle knight visit this weekend"})]
    assert ids(HistoryRetriever(TWEETS, mixed).top_k(PREFIX + "weekend", 2)) == ["8", "5"]


def test_documents_without_words():
    empty = [HistoryItem(str(i), {"text": "... !!"}) for i in range(4)]
    r = HistoryRetriever(TWEETS, empty)
    assert ids(r.top_k(QUERY, 2)) == ["3", "2"]
    assert ids(r.top_k(QUERY, 9, before=3)) == ["2", "1", "0"]


def test_answer_field_is_not_indexed():
    """LaMP-4: titles are what the model must write, so BM25 only sees the article text."""
    task = get_task("LaMP-4")
    history = [
        HistoryItem("a", {"title": "Volcano erupts", "text": "Lava flowed near the town."}),
        HistoryItem("b", {"title": "Ash cloud", "text": "A volcano covered the village in ash."}),
        HistoryItem("c", {"title": "Volcano volcano volcano", "text": "Markets rose on Monday."}),
        HistoryItem("d", {"title": "Rain", "text": "Heavy rain in the hills."}),
        HistoryItem("e", {"title": "Sun", "text": "A hot summer day."}),
    ]
    r = HistoryRetriever(task, history)
    assert ids(r.top_k("Generate a headline for the following article: volcano", 2)) == ["b", "e"]


def test_several_fields_are_indexed():
    """LaMP-2N indexes title and text (not the category)."""
    task = get_task("LaMP-2N")
    history = [
        HistoryItem("a", {"title": "Election night", "text": "Votes were counted.", "category": "politics"}),
        HistoryItem("b", {"title": "Match report", "text": "A late goal decided it.", "category": "sports"}),
        HistoryItem("c", {"title": "Recipe", "text": "Bake the bread slowly.", "category": "food & drink"}),
        HistoryItem("d", {"title": "Museum", "text": "An election poster exhibition.", "category": "culture & arts"}),
        HistoryItem("e", {"title": "Flights", "text": "Cheap flights to Rome.", "category": "travel"}),
    ]
    r = HistoryRetriever(task, history)
    question = task.item_example({"title": "", "text": "election results and votes", "category": "politics"})[0]
    assert ids(r.top_k(question, 2)) == ["a", "d"]
    assert ids(r.top_k("... article: sports politics", 1)) == ["e"]  # categories are not searched: all tie


def test_later_items_do_not_change_the_ranking_of_earlier_ones():
    """IDF from the visible items only: later items full of "banana" must not make "apple" look rarer."""
    texts = ["apple z1 z2", "banana z3 z4", "c1", "c2", "c3", "banana q1", "banana q2", "banana q3"]
    history = [HistoryItem(str(i), {"text": t}) for i, t in enumerate(texts)]
    r = HistoryRetriever(TWEETS, history)
    # among items 0-4 apple and banana are equally rare: a tie, so the more recent item 1 wins
    assert ids(r.top_k(PREFIX + "apple banana", 2, before=5)) == ["1", "0"]
    # over the whole history banana is common and the apple item ranks first
    assert ids(r.top_k(PREFIX + "apple banana", 2)) == ["0", "7"]
