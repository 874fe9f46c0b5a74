"""Loading a base model from the model cache, once per process: every user a worker serves shares it."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
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
    if torch_device.type == "cuda":
        # each weight read straight onto the GPU, not into a host copy per client first (an 8B base: 16 GB each);
        # 4-bit weights are quantized as they are placed (a quantized model cannot move). A CPU loads on the host.
        settings["device_map"] = {"": torch_device.index or 0}
    if quantize != "none":
        settings["quantization_config"] = quantization_config(quantize, device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **settings)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_weightless(model_dir: Path) -> PreTrainedModel:
    """The base's layers with zero-strided stand-ins for its weights (4 bytes each, whatever the model's size), in
    float32: all that peft reads to create and seed an adapter (the layers' order and shapes), so the server starts
    FedAvg from the same seeded task LoRA as from the loaded base without reading or holding the base (an 8B one:
    32 GB in float32). Only config.json is read."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    stand_ins: dict[int, torch.nn.Parameter] = {}  # by meta weight: tied weights stay one (counted once in a share)
    for module in model.modules():
        for name, weight in list(module.named_parameters(recurse=False)):
            if id(weight) not in stand_ins:
                stand_in = torch.zeros((), dtype=weight.dtype).expand(weight.shape)
                stand_ins[id(weight)] = torch.nn.Parameter(stand_in, requires_grad=False)
            setattr(module, name, stand_ins[id(weight)])
    return model
