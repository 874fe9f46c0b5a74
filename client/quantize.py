"""QLoRA on a device: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only) and the task LoRA merged into a
dequantized copy of the layers it adapts, never into 4-bit weights.

Why a dequantized copy: merging into 4-bit weights (peft's `merge_and_unload` on a `Linear4bit`) dequantizes,
adds the LoRA and quantizes again, so the task-adapted base would answer with a second rounding error that the
training users never saw; bench/gpu_check.sh measures both against the unmerged adapter (docs/benchmarks.md).
The dequantized q,v of SmolLM2 cost 13M bf16 weights per worker; every other layer stays 4-bit and shared.
"""

from __future__ import annotations

import copy
import itertools
from importlib.util import find_spec

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel

NF4 = "nf4"
GPU_EXTRA = "pip install -e '.[gpu]'"


def quantization_problem(quantize: str, device: str) -> str | None:
    """Why `quantize` cannot run for clients on `device` here (one line), or None when it can."""
    if quantize == "none":
        return None
    if device == "cpu" or not torch.cuda.is_available():
        return (f"--quantize {quantize} loads the base with bitsandbytes on a CUDA GPU, and "
                f"{'--device cpu was given' if device == 'cpu' else 'no CUDA GPU is visible here'}; "
                "bitsandbytes' 4-bit LoRA gradients are not reliable on a CPU, so run without --quantize")
    if find_spec("bitsandbytes") is None:
        return f"--quantize {quantize} needs bitsandbytes, which is not installed: run `{GPU_EXTRA}`"
    return None


def quantization_config(quantize: str, device: str) -> BitsAndBytesConfig:
    """The 4-bit NF4 config (bf16 compute) of QLoRA; a ValueError saying why where it cannot run."""
    problem = quantization_problem(quantize, device)
    if problem:
        raise ValueError(problem)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=NF4, bnb_4bit_compute_dtype=torch.bfloat16)


def dequantized_copy(model: PreTrainedModel, targets: tuple[str, ...]) -> PreTrainedModel:
    """A copy of a 4-bit `model` whose `targets` layers are plain linears holding the dequantized weights (what a
    4-bit layer computes with) in the dtype of the model's activations (`model.dtype`, that of its unquantized
    weights: bf16, or fp32 under --dtype float32); every other tensor is shared with `model`."""
    import bitsandbytes as bnb

    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    result = copy.deepcopy(model, memo=shared)
    for name, module in list(result.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, bnb.nn.Linear4bit):
            result.set_submodule(name, _dequantized(module, model.dtype))
    return result


@torch.no_grad()
def _dequantized(layer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Linear:
    """The linear a 4-bit layer computes, as a `dtype` layer, read through its own forward on the identity (which
    returns its input's dtype; bitsandbytes' CPU backend repacks weights at the first forward, after which its
    dequantize_4bit no longer reads them right)."""
    weight = layer(torch.eye(layer.in_features, device=layer.weight.device, dtype=dtype))  # [in, out]: W^T + bias
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                             device=weight.device, dtype=dtype)
    if layer.bias is not None:
        weight -= layer.bias.to(dtype)
        linear.bias.copy_(layer.bias)
    linear.weight.copy_(weight.T)
    return linear.requires_grad_(False)
