"""What the population says about each item, on a device: a user's contribution to the securely summed item table,
and the user's prompts annotated from the table (`--item-statistics`; docs/privacy.md says what it costs).

A personal adapter learns the user's level; to beat it the model must know how people rate each item
(docs/quality.md). The task LoRA learns that only from the whole population's ratings at many large steps, hours on 2
cores. This is the cheap route: every training user's node (the population outside the test users, as in the paper)
adds, for each item it rated, the rating, its offset from the user's mean rating and a count into a hashed table
(common/item_table.py); SecAgg+ sums the tables, so the server learns only the population's sums; every node then
reads, beside each question, the other users' mean rating of that item and how far it is from their own usual
rating. A test user's node sends no table (it sends metric statistics only); a training user's node removes its
own contribution before it reads the table (leave one out), so no prompt shows the user's own rating of the item
it asks about.
"""

from __future__ import annotations

import dataclasses
import math
import statistics as stats

import numpy as np

from client.data import User
from common.config import RunConfig
from common.item_table import ItemReading, ItemTable
from common.tasks import ANNOTATION_FIELD, TaskSpec, get_task


def item_text(task: TaskSpec, fields: dict[str, str]) -> str:
    """The text that names a history item (its one non-answer field, e.g. the movie)."""
    return fields[task.item_key_field]


def contribution(user: User, task: TaskSpec, clip: float | None = None) -> ItemTable:
    """This user's table: each rated item's rating and its offset from the user's mean rating, in its bucket;
    `clip`: scaled to that L2 norm, as --item-dp-epsilon sends it (ItemTable.clipped)."""
    table = ItemTable.empty()
    if not user.history:
        return table
    scores = [float(item.fields[task.answer_field]) for item in user.history]
    level = stats.fmean(scores)
    for item, score in zip(user.history, scores):
        table.add(item_text(task, item.fields), score, score - level)
    return table.clipped(clip) if clip is not None else table


def sent_vector(user: User, cfg: RunConfig, round_clients: int) -> list[np.ndarray]:
    """The vector a training user's node adds to the SecAgg+ sum: its table; under --item-dp-epsilon its clipped
    table with its share of the noise (std / sqrt(nodes of the round)), so the sum carries the noise whole."""
    table = contribution(user, get_task(cfg.task))
    if cfg.item_dp_epsilon <= 0:
        return table.vector()
    return table.private_vector(cfg.item_dp_clip, cfg.item_noise_std() / math.sqrt(round_clients))


def others_line(reading: ItemReading) -> str:
    """An item's annotation: the other users' mean rating of it and how far that is from their usual rating."""
    return (f"other users rate it {reading.mean:.1f} on average, {reading.offset:+.1f} against their usual rating "
            f"({reading.raters} rated it)")


def others_table(user: User, role: str, task: TaskSpec, table: ItemTable, clip: float | None = None) -> ItemTable:
    """The population `table` without `user`'s own ratings: a training user's contribution is in the sum, a test
    user's never is (role: the node's, "train" or "test"); `clip`: the contribution was clipped to it (a noisy
    table, --item-dp-epsilon)."""
    return table.minus(contribution(user, task, clip)) if role == "train" else table


def annotate(user: User, task: TaskSpec, others: ItemTable) -> User:
    """The user with each query's input and each history item's question (its ANNOTATION_FIELD) ending in its
    item's `others_line`, read from `others` (the population's table without this user: `others_table`). Both then
    read '...movie: <movie>; other users rate it ...'; an item nobody else rated gets no line. Retrieved items stay
    as they were: one item's line beside the question's own would be a second number to confuse with it
    (validation: `oppu+rag-k1` 0.904 with it, 0.856 without; docs/quality.md)."""
    texts = [item_text(task, item.fields) for item in user.history]
    texts += [task.retrieval_query(q.input) for q in user.queries]
    lines = [f"; {others_line(r)}" if r.raters else "" for r in others.read(texts)]
    history = [dataclasses.replace(item, fields={**item.fields, ANNOTATION_FIELD: line})
               for item, line in zip(user.history, lines)]
    queries = [dataclasses.replace(q, input=q.input + line) for q, line in zip(user.queries, lines[len(user.history):])]
    return dataclasses.replace(user, history=history, queries=queries)


def query_readings(user: User, task: TaskSpec, others: ItemTable) -> list[ItemReading]:
    """The reading of each query's item in `others`, for the reference rows ref-population and ref-level-item
    (client/references.py); `user` as it was before `annotate`."""
    return others.read([task.retrieval_query(q.input) for q in user.queries])
