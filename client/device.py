"""Where a device computes and in which dtype: CUDA when present, bf16 only where it measurably pays."""

from __future__ import annotations

import os
import time
from functools import cache

import torch

from common.config import check_dtype_name

BF16_MIN_SPEEDUP = 1.5  # a CPU computes in bf16 only if it is at least this much faster than fp32

KERNEL_CACHE_CAPACITY = 64
"""Matrix-product kernels a process keeps in each of torch's two CPU caches (ideep's and oneDNN's; default 1024).

oneDNN builds a kernel for each new product shape (about 0.6 MB in bf16) and by default keeps it: with batches as
wide as their longest row (a few dozen widths over a run) a training worker grew 20 MB a user. A training step uses
about 15 kernels, so 64 hold a few steps' worth; rebuilding one that fell out takes under a millisecond (SmolLM2,
bf16, 12 users in one process: memory flat). The capacities are read once, at a process's first product."""


def bound_kernel_caches() -> None:
    """Cap the CPU kernel caches of this process (a capacity already set in the environment is kept)."""
    for name in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(KERNEL_CACHE_CAPACITY))


bound_kernel_caches()  # at import: every path that computes on a client imports this module before its first product


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
def cpu_bf16_speedup(rows: int = 128, width: int = 576, repeats: int = 7) -> float:
    """bf16 over fp32 matmul rate of one core on a layer-sized product (20-50 ms on a Zen 4).

    One thread, whatever the process uses: the kernels are what differ between the dtypes, and a thread the
    scheduler preempts swings the ratio. At 2 threads beside two busy processes a Zen 4 measured anything from 0.05
    to 27, so processes of one run computed in different dtypes. Alternating the dtypes spreads any load over both;
    each keeps its fastest time.
    """
    operands = {dtype: (torch.randn(rows, width, dtype=dtype), torch.randn(width, width, dtype=dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    fastest = dict.fromkeys(operands, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for a, b in operands.values():
            a @ b  # first call: kernel choice and allocation
        for _ in range(repeats):
            for dtype, (a, b) in operands.items():
                start = time.perf_counter()
                a @ b
                fastest[dtype] = min(fastest[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return fastest[torch.float32] / fastest[torch.bfloat16]


def resolve_dtype(dtype: str, device: str) -> str:
    """A dtype name from 'auto' (pick_dtype), 'float32' or 'bfloat16'; anything else is an error."""
    check_dtype_name(dtype)
    return str(pick_dtype(torch.device(device))).removeprefix("torch.") if dtype == "auto" else dtype


def attention_for(device: torch.device, dtype: str) -> str | None:
    """Eager attention on CUDA and for bf16 on a CPU; for fp32 on a CPU the library's default (None: sdpa where the
    architecture has it, else eager; asking for sdpa by name fails on one without it, e.g. Gemma-2).

    CUDA: with left padding, a pad position attends to nothing, and torch's fused SDPA kernels give NaN for such
    rows (pytorch#103749, #125674); on an H200 every task-adaptation update of SmolLM2 came back NaN in bf16 and nf4,
    while eager attention masks with the dtype's minimum and stays finite. CPU bf16: the fused backward made a LoRA
    step 25% slower (SmolLM2, 1 thread, 64-512 tokens)."""
    return "eager" if device.type == "cuda" or dtype == "bfloat16" else None
