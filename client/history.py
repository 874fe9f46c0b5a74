"""Which history items a device personalizes with: the recent ones, or (behaviour shift, paper Table 3)
the ones least relevant to the user's queries; and the validation view that tuning uses instead of the test
queries."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from client.data import Query, User
from client.embeddings import embed
from common.tasks import TaskSpec

if TYPE_CHECKING:
    from common.config import RunConfig



def validation_view(user: User, task: TaskSpec, items: int) -> User:
    """The user as tuning sees it: the `items` latest history items (those just before the test queries) become
    the queries, with their answers as golds, and the test queries are dropped, so no choice made on this view
    ever reads a test query. Personal training and retrieval see only the history before them."""
    if len(user.history) <= items:
        raise ValueError(
            f"split validation: user {user.user_id!r} has {len(user.history)} history items, needs more than "
            f"--validation-items {items}"
        )
    cut = len(user.history) - items
    queries = [
        Query(id=f"val-{h.id}", input=task.item_example(h.fields)[0], gold=h.fields[task.answer_field])
        for h in user.history[cut:]
    ]
    return dataclasses.replace(user, history=user.history[:cut], queries=queries)


def select_history(user: User, task: TaskSpec, cfg: RunConfig) -> User:
    """The user with only the history that personal training, retrieval and the profile may use.

    'recent' keeps everything (max-history then takes the latest items). 'least-relevant' keeps the
    `cfg.selection_items` items whose highest cosine similarity to any of the user's queries is lowest
    (MiniLM embeddings of the item's input fields and of the query's item part): with the max, a kept item
    is far from every query, which is the shift the study simulates; a mean could keep an item that
    nearly matches one query. Kept items stay in their original order.
    """
    if cfg.history_selection == "recent" or len(user.history) <= cfg.selection_items:
        return user
    if not user.queries:
        raise ValueError(f"history-selection least-relevant: user {user.user_id!r} has no queries to compare with")
    items = embed([task.item_input(h.fields) for h in user.history])  # [H, 384], unit length
    queries = embed([task.retrieval_query(q.input) for q in user.queries])  # [Q, 384]
    relevance = (items @ queries.T).max(dim=1).values  # [H]
    least = torch.argsort(relevance, stable=True)[: cfg.selection_items]  # ties: the earlier item first
    return dataclasses.replace(user, history=[user.history[i] for i in sorted(least.tolist())])
