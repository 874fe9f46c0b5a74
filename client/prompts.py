"""Prompt = {USER PROFILE} + {RETRIEVED HISTORY} + question, fitted into a token budget.

Prompts are built as token ids, segment by segment, so training and evaluation see exactly the same
tokens and truncation can shorten the optional parts without ever touching the question.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from client.data import HistoryItem
from common.tasks import TaskSpec

ANSWER_CUE = "\nAnswer: "
PROFILE_HEADER = "User profile: "
HISTORY_HEADER = "Relevant earlier items of this user:\n"


@dataclass(frozen=True)
class Prompt:
    """Token ids of a prompt and how many tokens each optional part kept (for checks and stats)."""

    ids: list[int]
    question_tokens: int
    profile_tokens: int
    history_tokens: int


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt(
    task: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    retrieved: list[HistoryItem] = (),  # type: ignore[assignment]
    profile: str | None = None,
    max_tokens: int = 512,
) -> Prompt:
    """The prompt's token ids; profile and history items are cut to fit `max_tokens`, the question never."""
    question_ids = _ids(tokenizer, question + ANSWER_CUE)
    budget = max_tokens - len(question_ids)
    parts: list[int] = []
    profile_kept = history_kept = 0
    if profile and budget > 0:
        header = _ids(tokenizer, PROFILE_HEADER)
        share = budget // 2 if retrieved else budget  # leave room for the history part
        body = _ids(tokenizer, profile.strip() + "\n")[: max(0, share - len(header))]
        if body:
            parts += header + body
            profile_kept = len(body)
            budget -= len(header) + len(body)
    if retrieved and budget > 0:
        header = _ids(tokenizer, HISTORY_HEADER)
        per_item = (budget - len(header)) // len(retrieved)
        items = [_ids(tokenizer, "- " + task.item_text(item.fields) + "\n") for item in retrieved]
        items = [ids[:per_item] for ids in items if per_item > 0]
        if items:
            parts += header + [token for ids in items for token in ids]
            history_kept = sum(len(ids) for ids in items)
    return Prompt(parts + question_ids, len(question_ids), profile_kept, history_kept)
