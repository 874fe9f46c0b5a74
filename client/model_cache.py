"""The node's model cache: where it is, finding a model by its content hash, and loading a base once per process."""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from client.device import attention_for, resolve_dtype
from client.quantize import quantization_config
from common.model_files import MANIFEST, verify_model_dir
from common.store import read_saved_state

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Model cache: $OPPU_CACHE_DIR, else ~/.cache/oppu-fl."""
    return Path(os.environ.get("OPPU_CACHE_DIR", Path.home() / ".cache" / "oppu-fl"))


def model_slug(name: str) -> str:
    """A directory name for a model name or path."""
    return "".join(c if c.isalnum() or c in "-_." else "--" for c in name.strip("/"))


def load_base(
    model_dir: Path, device: str = "cpu", dtype: str = "auto", quantize: str = "none"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Base model and tokenizer, loaded once per process and shared by every user on this worker."""
    return _load_base(Path(model_dir).resolve(), device, resolve_dtype(dtype, device), quantize)


def load_fresh(model_dir: Path, device: str = "cpu", dtype: str = "auto", quantize: str = "none") -> PreTrainedModel:
    """An unshared copy of the base."""
    return _load_base.__wrapped__(Path(model_dir).resolve(), device, resolve_dtype(dtype, device), quantize)[0]


@cache
def _load_base(model_dir: Path, device: str, dtype: str, quantize: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    torch_device = torch.device(device)
    settings = {"dtype": getattr(torch, dtype), "attn_implementation": attention_for(torch_device, dtype)}
    if quantize == "none":
        model = AutoModelForCausalLM.from_pretrained(model_dir, **settings).to(torch_device)
    else:  # 4-bit weights are placed on the GPU as they are quantized (a quantized model cannot be moved)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=quantization_config(quantize, device), device_map={"": torch_device.index or 0},
            **settings,
        )
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def find_model_by_hash(sha256: str, cache_dir: Path | None = None) -> Path | None:
    """An intact model directory in the cache whose manifest records this content hash (a damaged one is passed
    over, so the node gets the model sent again)."""
    models = (cache_dir or default_cache_dir()) / "models"
    for manifest in sorted(models.glob(f"*/{MANIFEST}")) if models.is_dir() else []:
        if (read_saved_state(manifest) or {}).get("sha256") == sha256:
            problem = cache_problem(manifest.parent)
            if problem is None:
                return manifest.parent
            log.warning("model cache %s: %s; not used", manifest.parent, problem)
    return None


_intact: dict[Path, tuple] = {}  # model directories verified in this process, with the file stats they had then


def cache_problem(model_dir: Path) -> str | None:
    """What is wrong with a model directory of the cache (None: intact): missing, no readable manifest (half made),
    or files that do not hash to the manifest's sha256 (truncated, altered). The full hash (about a second for
    SmolLM2) runs once per process while the files' sizes and times stay as they were."""
    if not model_dir.is_dir():
        return "missing"
    manifest = read_saved_state(model_dir / MANIFEST)
    if not manifest or not isinstance(manifest.get("sha256"), str):
        return f"no readable {MANIFEST} (a directory left half made)"
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model_dir.iterdir()))
    if _intact.get(model_dir) == stats:
        return None
    try:
        verify_model_dir(model_dir)
    except ValueError:
        return "its files do not match the sha256 in its manifest (truncated or altered)"
    _intact[model_dir] = stats
    return None
