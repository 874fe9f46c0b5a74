"""What every benchmark shares: the machine's measured matmul peak, model FLOPs, real users, and result output.

Figures are only comparable within one run on one machine, so each script measures its own peak and its
baselines side by side; nothing here is a timed assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics as stats
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.device import bound_kernel_caches
from common.store import atomic_write_json

bound_kernel_caches()  # a benchmark's products run under a run's kernel caches (read at a process's first product)

PEAK_SHAPES = ((512, 576, 1536), (1024, 1536, 576), (2048, 2048, 2048))


def matmul_peak_gflops(dtype: torch.dtype, device: str = "cpu", repeats: int = 20) -> float:
    """Best GFLOP/s of plain matmuls at the current thread count (shapes of a small LLM's layers and a square)."""
    best = 0.0
    big = ((8192, 8192, 8192),) if torch.device(device).type == "cuda" else ()  # a GPU needs a larger product to fill
    for m, k, n in PEAK_SHAPES + big:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(2):
            a @ b
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        seconds = (time.perf_counter() - start) / repeats
        best = max(best, 2 * m * k * n / seconds / 1e9)
        if best < 20:  # a dtype without a fast kernel: one shape says enough and the square would take minutes
            break
    return best


MATMUL_OPS = ("aten::mm", "aten::bmm")
PROFILER_DTYPES = {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16}


def matmuls_alone(work: Callable[[], object], repeats: int = 5) -> dict[str, float]:
    """The matrix products `work` runs on the CPU, each timed again alone (same shapes, strides and dtypes).

    Their sum is the floor of the loop at its own shapes: what it would take if every other op (elementwise
    math, dtype copies, dispatch, autograd bookkeeping) cost nothing. Also returned: the time the products took
    inside the loop (the profiler's own count, so a little inflated) and the number of calls.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        work()
    calls: Counter[tuple] = Counter()
    in_loop = 0.0
    for event in prof.events():
        if event.name in MATMUL_OPS:
            operands = tuple(zip(map(tuple, event.input_shapes[:2]), map(tuple, event.structured_input_strides[:2]),
                                 event.input_dtypes[:2]))
            calls[(event.name, operands)] += 1
            in_loop += event.self_cpu_time_total / 1e6
    tensors: dict[tuple, torch.Tensor] = {}  # one tensor per operand layout: the vocabulary head meets many row counts
    alone = sum(count * _product_seconds(name, operands, repeats, tensors) for (name, operands), count in calls.items())
    return {"matmul_seconds_in_loop": in_loop, "matmul_seconds_alone": alone, "matmul_calls": float(sum(calls.values()))}


def _product_seconds(name: str, operands: tuple, repeats: int, tensors: dict[tuple, torch.Tensor]) -> float:
    """Best time of one product on random operands laid out as in the loop (made once per layout)."""
    for shape, strides, dtype in operands:
        if (shape, strides, dtype) not in tensors:
            tensors[shape, strides, dtype] = torch.empty_strided(shape, strides, dtype=PROFILER_DTYPES[dtype]).normal_()
    a, b = (tensors[spec] for spec in operands)
    product = torch.mm if name == "aten::mm" else torch.bmm
    product(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def synchronize(device: str) -> None:
    """Wait for queued CUDA work, so a timer reads finished work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def linear_params(model: nn.Module) -> tuple[int, int]:
    """(weights of the decoder's linear layers, weights of the vocabulary head): what a token's FLOPs scale with."""
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head
               and m.weight.requires_grad is False)
    return body, head.weight.numel()


def training_flops(model: nn.Module, tokens: int, answer_tokens: int) -> float:
    """Useful FLOPs of LoRA training on `tokens` real tokens, `answer_tokens` of them scored.

    Forward 2 FLOPs per weight per token, backward 2 more for activation gradients (the frozen base gets no
    weight gradients); the vocabulary head is needed only where a loss is taken. Padding and logits of
    prompt positions are waste and not counted, so both training loops are measured against the same work.
    """
    body, head = linear_params(model)
    return 4.0 * body * tokens + 4.0 * head * answer_tokens


def expected_spread(expected: list[float], golds: list[float]) -> dict[str, float | None]:
    """Mean and spread of a model's expected ratings over questions, and their Pearson correlation with the gold
    (None where either side is constant: a correlation of a constant is undefined)."""
    spread = stats.pstdev(expected)
    flat = spread < 1e-12 or stats.pstdev(golds) == 0
    return {"mean": stats.fmean(expected), "sd": spread, "corr": None if flat else stats.correlation(expected, golds)}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "amx": bool(torch.cpu._is_amx_tile_supported()), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark takes."""
    parser.add_argument("--model", default="smollm2", help="base model (as flower-simulation --model)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 = what one simulated client gets with --cpus-per-client 1)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")


def finish(args: argparse.Namespace, results: dict[str, Any], table: list[str]) -> dict[str, Any]:
    """Print the table and the JSON; write the JSON to --out (atomically)."""
    results = {"machine": machine(), **results}
    print("\n".join(table))
    print(json.dumps(results, indent=1))
    if args.out:
        atomic_write_json(args.out, results)
    return results


def test_users(count: int) -> list:
    """The first `count` test users of the default run (MovieLens, longest histories)."""
    from client.partition import load_users, split_users
    from common.config import RunConfig, UserCounts

    cfg = RunConfig()
    return split_users(load_users(cfg, count), UserCounts(count, 0), cfg)[0]


def load_model(args: argparse.Namespace, dtype: str, quantize: str = "none"):
    """(model, tokenizer) of --model in `dtype` ('auto': as a run picks it) on --device, with --threads set first;
    `quantize` as a run's --quantize."""
    from client.device import pick_device
    from client.model_build import resolve_model
    from client.model_loading import load_base

    torch.set_num_threads(args.threads)
    return load_base(resolve_model(args.model), str(pick_device(args.device)), dtype, quantize)


def train_fresh_lora(base: nn.Module, examples: list, pad_id: int, settings, seed: int) -> dict[str, float]:
    """`train_adapter` on a fresh LoRA (r=8 on q,v), as a personal adapter is trained in a run; the base is left clean."""
    from client.adapters import attach_fresh
    from client.training import train_adapter
    from common.config import PeftSettings

    model = attach_fresh(base, PeftSettings(), "bench", seed)
    try:
        return train_adapter(model, examples, pad_id, settings, seed)
    finally:
        model.unload()
