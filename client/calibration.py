"""The calibration round's part on a test user's device: how the shared model (the task-adapted base, no personal
adapter) would have answered the user's latest items before the questions at each answer quantile
(common/metrics.ANSWER_QUANTILES). Those items are the user's validation items, never a question it is scored on:
under --split test its 5 latest history items, under --split validation the 5 before its validation questions.
The server pools the users' errors and picks the quantile the shared model's methods answer at
(server/calibration.py)."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.data import User
from client.evaluate import predict, query_prompts
from client.history import validation_view
from common.config import RunConfig
from common.metrics import quantile_errors
from common.tasks import get_task


def calibration_errors(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig,
                       user: User) -> tuple[list[float], int]:
    """(mean absolute error per answer quantile, items scored) of `model` on the --validation-items latest items of
    `user` (the history this run may read, annotated as its questions are), asked as its questions are; ([], 0)
    for a history too short to spare them."""
    task = get_task(cfg.task)
    if len(user.history) <= cfg.validation_items:
        return [], 0
    view = validation_view(user, task, cfg.validation_items)
    prompts = query_prompts(view, task, tokenizer, cfg.prompt_settings(0), None)
    _, probabilities = predict(model, tokenizer, task, prompts, rule="median")
    assert probabilities is not None  # a rating task is scored over its labels
    return quantile_errors(task.labels, probabilities, [q.gold for q in view.queries]), len(view.queries)
