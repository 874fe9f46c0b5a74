"""Predictions for a user's queries: label scoring for label tasks, greedy generation otherwise.

A prediction is read from the generated tokens only (never by string-replacing the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.data import User
from client.forward import answer_logprobs, left_pad, next_token_logits
from client.prompts import build_prompt
from client.retrieval import HistoryRetriever
from common.config import PromptSettings
from common.metrics import decide, decision_rule
from common.tasks import TaskSpec

Decoding = Literal["auto", "score", "generate"]


def query_prompts(
    user: User, task: TaskSpec, tokenizer: PreTrainedTokenizerBase, settings: PromptSettings, profile: str | None
) -> list[list[int]]:
    """Prompt ids for each query; retrieval sees the user's whole history (all of it precedes the queries)."""
    retriever = HistoryRetriever(task, user.history)
    return [
        build_prompt(
            task, tokenizer, q.input, retriever.top_k(q.input, settings.k),
            profile if settings.use_profile else None, settings.max_prompt_tokens,
        ).ids
        for q in user.queries
    ]


@torch.inference_mode()
def label_probabilities(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    labels: Sequence[str],
    prompts: Sequence[list[int]],
    max_rows: int = 32,
) -> list[list[float]]:
    """The model's distribution over `labels` after each prompt (renormalised over the labels alone).

    Labels that are single distinct tokens (ratings) are read from one forward of the prompt; others are
    scored as the sum of log-probs of their tokens + EOS, one row per (prompt, label).
    """
    encoded = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    if all(len(ids) == 1 for ids in encoded) and len({ids[0] for ids in encoded}) == len(encoded):
        label_tokens = torch.tensor([ids[0] for ids in encoded])
        totals = []
        for start in range(0, len(prompts), max_rows):
            logits = next_token_logits(model, prompts[start : start + max_rows], tokenizer.pad_token_id)
            totals += logits[:, label_tokens.to(logits.device)].tolist()
    else:
        candidates = [ids + [tokenizer.eos_token_id] for ids in encoded]
        pairs = [(p, c) for p in prompts for c in candidates]
        flat: list[float] = []
        for start in range(0, len(pairs), max_rows):
            chunk = pairs[start : start + max_rows]
            logprobs, mask = answer_logprobs(model, [p for p, _ in chunk], [c for _, c in chunk], tokenizer.pad_token_id)
            flat += (logprobs * mask).sum(-1).tolist()
        totals = [flat[i * len(labels) : (i + 1) * len(labels)] for i in range(len(prompts))]
    return torch.tensor(totals, dtype=torch.float64).reshape(len(prompts), len(labels)).softmax(-1).tolist()


@torch.inference_mode()
def generate(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """Greedy decoding, batched with the KV cache; the text of the new tokens only."""
    outputs = []
    device = next(model.parameters()).device
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        batch_size = 1  # virtual tokens precede the padding: batching would shift a row's positions
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], tokenizer.pad_token_id)
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            temperature=None, top_p=None, top_k=None, no_repeat_ngram_size=no_repeat_ngram_size,
        )
        new_tokens = generated[:, ids.shape[1] :]
        outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return outputs


def predict(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    prompts: Sequence[list[int]],
    decoding: Decoding = "auto",
    rule: str = "auto",
    quantile: float = 0.5,
) -> tuple[list[str], list[list[float]] | None]:
    """(predictions, label probabilities per prompt): label scoring with a decision rule where the task has
    labels (unless told to generate), the median rule at `quantile`; greedy generation otherwise, with no
    probabilities."""
    if decoding == "score" or (decoding == "auto" and task.labels):
        if not task.labels:
            raise ValueError(f"{task.name} has no label list to score; use generation")
        chosen = decision_rule(task, rule)
        probabilities = label_probabilities(model, tokenizer, task.labels, prompts)
        return [decide(task.labels, row, chosen, quantile) for row in probabilities], probabilities
    return generate(model, tokenizer, prompts, task.max_new_tokens), None
