"""The one forward pass shared by training and label scoring: log-probs of each sequence's answer tokens.

Sequences are left-padded so every answer ends at the last position; the model then computes vocabulary
logits only for the last K+1 positions (`logits_to_keep`), not for the whole prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedModel


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] token ids and attention mask, padded on the left to a width T that is a multiple of `multiple_of`."""
    width = -(-max(len(s) for s in sequences) // multiple_of) * multiple_of
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def _uses_prompt_learning(model: PreTrainedModel | PeftModel) -> bool:
    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning


def _last_logits(
    model: PreTrainedModel | PeftModel, sequences: Sequence[Sequence[int]], pad_id: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, keep, V] of the last `keep` positions of left-padded sequences, and the padded ids [B, T].

    Prompt tuning runs row by row: peft puts its virtual tokens before the padding and ignores position
    ids, so a padded row would see its prompt at another distance than when run alone.
    """
    ids, mask = left_pad(sequences, pad_id)  # to the longest row: kernels per shape are bounded by client.device
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    if _uses_prompt_learning(model):
        rows = [
            model(input_ids=ids[i : i + 1, -len(seq) :], logits_to_keep=keep, use_cache=False).logits
            for i, seq in enumerate(sequences)
        ]
        return torch.cat(rows), ids
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # indices, not a count: the head then reads a contiguous copy of the kept positions; a strided slice makes
    # torch run it as a batched matmul that copies the whole vocabulary matrix per row (38x slower in bf16)
    kept = torch.arange(ids.shape[1] - keep, ids.shape[1], device=device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=kept, use_cache=False).logits
    return logits, ids


def answer_logprobs(
    model: PreTrainedModel | PeftModel,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [B, K] of each answer token given its prompt, and the [B, K] mask of real tokens."""
    k = max(len(a) for a in answers)
    logits, ids = _last_logits(model, [list(p) + list(a) for p, a in zip(prompts, answers)], pad_id, k + 1)
    logprobs = torch.log_softmax(logits[:, :k].float(), dim=-1)  # [B, K, V]: position t predicts token t+1
    token_logprobs = logprobs.gather(-1, ids[:, -k:].unsqueeze(-1)).squeeze(-1)  # [B, K]
    lengths = torch.tensor([len(a) for a in answers], device=ids.device)
    answer_mask = torch.arange(k, device=ids.device).unsqueeze(0) >= (k - lengths).unsqueeze(1)
    return token_logprobs, answer_mask


def next_token_logits(model: PreTrainedModel | PeftModel, prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Logits [B, V] of the token following each prompt (one forward, no answer tokens)."""
    return _last_logits(model, prompts, pad_id, 1)[0][:, -1].float()
