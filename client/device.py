"""Where a device computes and in which dtype: CUDA when present, bf16 only where it measurably pays."""

from __future__ import annotations

import time
from functools import cache

import torch

from common.config import check_dtype_name

BF16_MIN_SPEEDUP = 1.5  # a CPU computes in bf16 only if it is at least this much faster than fp32


def pick_device(prefer: str = "auto") -> torch.device:
    """CUDA when present (unless told otherwise), else the CPU."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 where this device computes it clearly faster than fp32, else fp32.

    CPU feature flags do not tell: AVX512-bf16 ran bf16 matmuls at 0.5x fp32 on one Intel and 4.4x on an AMD
    Zen 5, and an AVX2-only CPU at 0.01x. So a CPU's choice is measured once per process.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP:
        return torch.bfloat16
    return torch.float32


@cache
def cpu_bf16_speedup(rows: int = 128, width: int = 576, repeats: int = 3) -> float:
    """bf16 over fp32 matmul rate on a layer-sized product at the current thread count (13 ms on a Zen 5)."""

    def best_seconds(dtype: torch.dtype) -> float:
        a, b = torch.randn(rows, width, dtype=dtype), torch.randn(width, width, dtype=dtype)
        a @ b  # first call: kernel choice and allocation
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best_seconds(torch.float32) / best_seconds(torch.bfloat16)


def resolve_dtype(dtype: str, device: str) -> str:
    """A dtype name from 'auto' (pick_dtype), 'float32' or 'bfloat16'; anything else is an error."""
    check_dtype_name(dtype)
    return str(pick_dtype(torch.device(device))).removeprefix("torch.") if dtype == "auto" else dtype


def attention_for(device: torch.device, dtype: str) -> str:
    """Eager attention on CUDA and for bf16 on a CPU; the library default (sdpa) for fp32 on a CPU.

    CUDA: with left padding, a pad position attends to nothing, and torch's fused SDPA kernels give NaN for such
    rows (pytorch#103749, #125674); on an H200 every task-adaptation update of SmolLM2 came back NaN in bf16 and nf4,
    while eager attention masks with the dtype's minimum and stays finite. CPU bf16: the fused backward made a LoRA
    step 25% slower (SmolLM2, 1 thread, 64-512 tokens)."""
    return "eager" if device.type == "cuda" or dtype == "bfloat16" else "sdpa"
