"""Loading a base model from the model cache, once per process: every user a worker serves shares it."""

from __future__ import annotations

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
