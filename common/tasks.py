"""One TaskSpec per LaMP task (and the MovieLens rating task): fields, prompts, labels, metric kind.

The prompt wording follows the OPPU paper's appendix: an instruction, the query, and optional
{USER PROFILE} / {RETRIEVED HISTORY} parts that `client.prompts` places in front of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricKind = Literal["classification", "regression", "generation"]
HistoryFormat = Literal["both", "input", "output"]
HISTORY_FORMATS: tuple[HistoryFormat, ...] = ("both", "input", "output")

NEWS_CATEGORIES = (
    "travel", "education", "parents", "style & beauty", "entertainment", "food & drink",
    "science & technology", "business", "sports", "healthy living", "women", "politics",
    "crime", "culture & arts", "religion",
)
MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)
RATINGS = ("1", "2", "3", "4", "5")
# a field a device may add to a history item (--item-statistics, client/item_statistics.py): text that the item's
# question ends with, as a query's input ends with it; the item as retrieved into a prompt stays without it
ANNOTATION_FIELD = "annotation"


@dataclass(frozen=True)
class TaskSpec:
    """How one task reads its history items, asks its questions and is scored."""

    name: str
    description: str
    item_fields: tuple[str, ...]  # fields every history item must carry (besides id)
    item_template: str  # how a history item reads inside a prompt ({RETRIEVED HISTORY})
    question_template: str  # the query built from a history item, for training on history
    answer_field: str  # the history item field that answers `question_template`
    metric: MetricKind
    labels: tuple[str, ...] = ()
    item_answers_are_labels: bool = True  # history answers come from `labels` (LaMP-1's are paper titles)
    query_marker: str = ""  # text after this marker in a query input is what BM25 searches with
    max_new_tokens: int = 8
    # items name what many users rate (a movie's title), so the population's item table (--item-statistics) can say
    # how others rate a question's item; LaMP-3's items are each user's own review texts, which no one else has
    shared_items: bool = False

    def item_text(self, item_fields: dict[str, str]) -> str:
        """The history item as it appears in a prompt's retrieved-history part."""
        return self.item_template.format(**item_fields)

    def item_example(self, item_fields: dict[str, str]) -> tuple[str, str]:
        """A (question, answer) pair made from one history item: what a personal adapter learns."""
        question = self.question_template.format(**item_fields) + item_fields.get(ANNOTATION_FIELD, "")
        return question, item_fields[self.answer_field]

    def item_input(self, item_fields: dict[str, str]) -> str:
        """The item's input side: its non-answer fields' text, one per line (no instruction, no answer)."""
        return "\n".join(item_fields[f] for f in self.retrieval_fields)

    def item_target(self, item_fields: dict[str, str], history_format: HistoryFormat) -> tuple[str, str]:
        """(question, text to learn) for a history format (paper Table 4).

        'both' is the item's question and answer; 'input' and 'output' learn one side alone, with no question.
        """
        if history_format == "both":
            return self.item_example(item_fields)
        if history_format == "input":
            return "", self.item_input(item_fields)
        if history_format == "output":
            return "", item_fields[self.answer_field]
        raise ValueError(f"history format {history_format!r}: expected one of {', '.join(HISTORY_FORMATS)}")

    def retrieval_query(self, query_input: str) -> str:
        """The part of a query that describes the item (instructions and label lists removed)."""
        if self.query_marker and self.query_marker in query_input:
            # The first occurrence ends the instruction; the item text may contain the marker too.
            return query_input.split(self.query_marker, 1)[1].strip()
        return query_input

    @property
    def item_key_field(self) -> str:
        """The field that names a history item for --item-statistics (a rating task's item text, e.g. the movie)."""
        return self.retrieval_fields[0]

    @property
    def retrieval_fields(self) -> tuple[str, ...]:
        """Item fields indexed by BM25: everything but the answer (it is not in the query)."""
        return tuple(f for f in self.item_fields if f != self.answer_field) or self.item_fields


def _labels_text(labels: tuple[str, ...]) -> str:
    return "[" + ", ".join(labels) + "]"


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="LaMP-1",
            description="personalized citation identification",
            item_fields=("title", "abstract"),
            item_template='"{title}"',
            question_template='Write a title for the following abstract of a paper: {abstract}',
            answer_field="title",
            metric="classification",
            labels=("[1]", "[2]"),
            item_answers_are_labels=False,
            query_marker="without explanation.",  # the input ends with [1]: "..." [2]: "..."
        ),
        TaskSpec(
            name="LaMP-2N",
            description="personalized news categorization",
            item_fields=("title", "text", "category"),
            item_template='the category for the article: "{text}" is "{category}"',
            question_template=(
                "Which category does this article relate to among the following categories? "
                "Just answer with the category name without further explanation. categories: "
                + _labels_text(NEWS_CATEGORIES) + " article: {text}"
            ),
            answer_field="category",
            metric="classification",
            labels=NEWS_CATEGORIES,
            query_marker="article:",
        ),
        TaskSpec(
            name="LaMP-2M",
            description="personalized movie tagging",
            item_fields=("description", "tag"),
            item_template='the tag for the movie: "{description}" is "{tag}"',
            question_template=(
                "Which tag does this movie relate to among the following tags? "
                "Just answer with the tag name without further explanation. tags: "
                + _labels_text(MOVIE_TAGS) + " description: {description}"
            ),
            answer_field="tag",
            metric="classification",
            labels=MOVIE_TAGS,
            query_marker="description:",
        ),
        TaskSpec(
            name="LaMP-3",
            description="personalized product rating",
            item_fields=("text", "score"),
            item_template='{score} is the score for "{text}"',
            question_template=(
                "What is the score of the following review on a scale of 1 to 5? just answer with "
                "1, 2, 3, 4, or 5 without further explanation. review: {text}"
            ),
            answer_field="score",
            metric="regression",
            labels=RATINGS,
            query_marker="review:",
        ),
        TaskSpec(
            name="LaMP-4",
            description="personalized news headline generation",
            item_fields=("title", "text"),
            item_template='"{title}" is the title for "{text}"',
            question_template="Generate a headline for the following article: {text}",
            answer_field="title",
            metric="generation",
            query_marker="article:",
            max_new_tokens=32,
        ),
        TaskSpec(
            name="LaMP-5",
            description="personalized scholarly title generation",
            item_fields=("title", "abstract"),
            item_template='"{title}" is the title for "{abstract}"',
            question_template="Generate a title for the following abstract of a paper: {abstract}",
            answer_field="title",
            metric="generation",
            query_marker="paper:",
            max_new_tokens=32,
        ),
        TaskSpec(
            name="LaMP-7",
            description="personalized tweet paraphrasing",
            item_fields=("text",),
            item_template='"{text}"',
            question_template="Write a tweet in your own style.",
            answer_field="text",
            metric="generation",
            query_marker="before or after it:",
            max_new_tokens=48,
        ),
        TaskSpec(
            name="MovieLens",
            description="personalized movie rating (MovieLens-100K, LaMP-3 style)",
            item_fields=("movie", "score"),
            item_template="{movie}; rated {score} of 5",
            question_template="Rate the movie from 1 to 5. movie: {movie}",
            answer_field="score",
            metric="regression",
            labels=RATINGS,
            query_marker="movie:",
            shared_items=True,
        ),
    )
}

# The published LaMP output files name their task "LaMP_2" for both the news and the movie variant.
LAMP_FILE_TASK_NAMES = {
    "LaMP-1": "LaMP_1", "LaMP-2N": "LaMP_2", "LaMP-2M": "LaMP_2", "LaMP-3": "LaMP_3",
    "LaMP-4": "LaMP_4", "LaMP-5": "LaMP_5", "LaMP-7": "LaMP_7",
}


def get_task(name: str) -> TaskSpec:
    """The spec of a task by name, with the list of valid names in the error."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}") from None
