"""BM25 retrieval over one user's own history (RAG), causal when building training examples."""

from __future__ import annotations

import re

from rank_bm25 import BM25Okapi

from client.data import HistoryItem
from common.tasks import TaskSpec

_TOKEN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens: what BM25 matches on."""
    return _TOKEN.findall(text.lower())


class HistoryRetriever:
    """Ranks a user's history items against a query with BM25 (rank_bm25.BM25Okapi)."""

    def __init__(self, task: TaskSpec, history: list[HistoryItem]):
        self.task = task
        self.history = history
        self._documents = [
            tokenize(" ".join(item.fields[f] for f in task.retrieval_fields)) for item in history
        ]

    def top_k(self, query_input: str, k: int, before: int | None = None) -> list[HistoryItem]:
        """The k most relevant items, best first; with `before=i` only items older than item i.

        The index is built over the visible items only, so no statistic of a later item leaks in.
        Ties go to the more recent item.
        """
        visible = len(self.history) if before is None else min(before, len(self.history))
        if k <= 0 or visible == 0:  # rank_bm25 divides by the corpus size
            return []
        documents = self._documents[:visible]
        if not any(documents):
            return self.history[:visible][-k:][::-1]
        scores = BM25Okapi(documents).get_scores(tokenize(self.task.retrieval_query(query_input)))
        ranked = sorted(range(visible), key=lambda i: (-scores[i], -i))
        return [self.history[i] for i in ranked[:k]]
