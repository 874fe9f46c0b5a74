"""Personal-adapter training throughput and model-FLOPs utilisation, ours vs a naive loop, side by side.

    python -m bench.train_throughput                  # SmolLM2, 2 MovieLens test users, 1 thread
    python -m bench.train_throughput --threads 2 --users 4 --out runs/bench/train.json
    python -m bench.train_throughput --k 0 --batch-tokens 64,128,512    # cost of more, smaller steps
    python -m bench.train_throughput --batch-tokens 128,256 --floor     # and each loop's matmul floor

Both loops train a fresh LoRA (r=8 on q,v) per user on the same examples (each history item with one
BM25-retrieved earlier item, the default run's `oppu+rag` adapter), one epoch, from the same base:
- ours: `client.training.train_adapter`, length-bucketed batches of `--batch-tokens` (each budget given is
  measured, the run's default first: smaller batches are more optimiser steps for the same examples), left padding and
  vocabulary logits only where the loss is taken, in fp32 and in the dtype `pick_dtype` chooses for this machine;
- naive (the reference code's settings): plain peft, shuffled batches of 16 examples padded to the longest
  (multiple of 8), labels -100 on the prompt, the model's own loss over full logits, fp32 (and, where the
  machine picks bf16, also in bf16 on the same base as ours). "x naive" is against the fp32 naive loop.
MFU is useful model FLOPs per second (`bench.common.training_flops`: padding and prompt logits are not
counted) over the best matmul rate this script measures at the same thread count. With `--floor`, each of our
loops runs once more under the profiler and its matrix products are timed again alone at their own shapes,
strides and dtypes (`bench.common.matmuls_alone`): the share of the loop they are, and the MFU the loop would
reach if nothing else cost time (CPU only).
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from bench.common import (
    common_flags,
    finish,
    load_model,
    matmul_peak_gflops,
    matmuls_alone,
    test_users,
    train_fresh_lora,
    training_flops,
)
from client.device import pick_device, pick_dtype
from client.forward import left_pad
from client.training import Example, history_examples
from common.config import PromptSettings, TrainingSettings
from common.tasks import get_task

NAIVE_BATCH = 16


def naive_batches(examples: list[Example], pad_id: int, rng: random.Random) -> list[dict[str, torch.Tensor]]:
    """Shuffled fixed-size batches padded on the left to the longest row (multiple of 8), as the reference."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), NAIVE_BATCH):
        rows = [examples[i] for i in order[start : start + NAIVE_BATCH]]
        ids, mask = left_pad([e.prompt + e.answer for e in rows], pad_id, multiple_of=8)
        labels, _ = left_pad([[-100] * len(e.prompt) + e.answer for e in rows], -100, multiple_of=8)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def naive_training(base: PreTrainedModel, examples: list[Example], pad_id: int, seed: int) -> dict[str, float]:
    """One epoch of the reference code's loop on a fresh plain-peft LoRA; returns seconds and mean loss."""
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            task_type="CAUSAL_LM"))
    try:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batches = naive_batches(examples, pad_id, random.Random(seed))
        model.train()
        start, losses = time.perf_counter(), []
        for batch in batches:
            loss = model(**{k: v.to(base.device) for k, v in batch.items()}, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return {"seconds": time.perf_counter() - start, "loss": sum(losses) / len(losses), "steps": len(batches)}
    finally:
        model.unload()


def user_examples(tokenizer, users: int, items: int, k: int) -> list[list[Example]]:
    """Each benchmark user's training examples, built exactly as in a run."""
    task = get_task("MovieLens")
    return [history_examples(user, task, tokenizer, PromptSettings(k=k), max_items=items) for user in test_users(users)]


def measure(
    name: str, run, base: PreTrainedModel, per_user: list[list[Example]], peak: float, floor: bool = False
) -> dict[str, Any]:
    """Train every user with `run` (after one warm-up user) and sum up tokens, FLOPs, time and MFU; with `floor`,
    train them once more under the profiler and time the loop's matrix products alone (`matmuls_alone`)."""
    run(base, per_user[0][:4])  # warm-up: first-call allocations and kernel choices
    seconds = loss = 0.0
    tokens = answer_tokens = steps = 0
    for examples in per_user:
        result = run(base, examples)
        seconds += result["seconds"]
        steps += int(result["steps"])
        loss += result["loss"] / len(per_user)
        tokens += sum(len(e.prompt) + len(e.answer) for e in examples)
        answer_tokens += sum(len(e.answer) for e in examples)
    flops = training_flops(base, tokens, answer_tokens)
    row = {
        "loop": name, "dtype": str(base.dtype).removeprefix("torch."), "seconds": seconds, "tokens": tokens, "steps": steps,
        "tokens_per_s": tokens / seconds, "model_gflops": flops / seconds / 1e9,
        "mfu": flops / seconds / 1e9 / peak, "mean_loss": loss,
    }
    if floor:
        row.update(matmuls_alone(lambda: [run(base, examples) for examples in per_user]))
        row["matmul_floor_mfu"] = flops / row["matmul_seconds_alone"] / 1e9 / peak
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_flags(parser)
    parser.add_argument("--users", type=int, default=2, help="MovieLens test users (longest histories first)")
    parser.add_argument("--items", type=int, default=32, help="latest history items per user (the default run's)")
    parser.add_argument("--k", type=int, default=1, help="retrieved items in each training prompt")
    parser.add_argument("--batch-tokens", type=lambda text: [int(v) for v in text.split(",")], default=[256],
                        help="our token budgets per batch, comma-separated, each measured (default: 256, the run's)")
    parser.add_argument("--floor", action="store_true",
                        help="also time each of our loops' matrix products alone (one more pass under the profiler): "
                             "the loop's floor if every other op were free, and the MFU that floor reaches")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = str(pick_device(args.device))
    if args.floor and torch.device(device).type != "cpu":  # the profiler's CPU times say nothing of GPU kernels
        parser.error(f"--floor times matrix products on the CPU; this run trains on {device} (use --device cpu)")
    peaks = {"float32": matmul_peak_gflops(torch.float32, device), "bfloat16": matmul_peak_gflops(torch.bfloat16, device)}
    ours_dtype = str(pick_dtype(torch.device(device))).removeprefix("torch.")
    fp32, tokenizer = load_model(args, "float32")
    per_user = user_examples(tokenizer, args.users, args.items, args.k)
    pad = tokenizer.pad_token_id
    naive = lambda m, ex: naive_training(m, ex, pad, 0)  # noqa: E731
    rows = [measure("naive (reference settings)", naive, fp32, per_user, peaks["float32"])]

    def ours_at(budget: int):
        settings = TrainingSettings(epochs=1, lr=1e-3, max_batch_tokens=budget)
        return lambda m, ex: train_fresh_lora(m, ex, pad, settings, 0)

    ours = {budget: ours_at(budget) for budget in args.batch_tokens}
    rows += [measure(f"ours, {budget} tokens/batch", run, fp32, per_user, peaks["float32"], floor=args.floor)
             for budget, run in ours.items()]
    if ours_dtype != "float32":  # the naive loop in the same dtype too, to tell the dtype's gain from the loop's
        picked = load_model(args, ours_dtype)[0]
        rows.append(measure("naive (reference settings)", naive, picked, per_user, peaks[ours_dtype]))
        rows += [measure(f"ours, {budget} tokens/batch", run, picked, per_user, peaks[ours_dtype], floor=args.floor)
                 for budget, run in ours.items()]
    naive_tokens_per_s = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_naive"] = row["tokens_per_s"] / naive_tokens_per_s
    table = [
        f"matmul peak at {args.threads} thread(s): fp32 {peaks['float32']:.1f} GFLOP/s, bf16 {peaks['bfloat16']:.1f} GFLOP/s",
        "| loop | dtype | tokens | steps | seconds | tokens/s | model GFLOP/s | MFU | x naive | mean loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['loop']} | {r['dtype']} | {r['tokens']} | {r['steps']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
          f"{r['model_gflops']:.1f} | {r['mfu']:.0%} | {r['speedup_vs_naive']:.2f} | {r['mean_loss']:.3f} |" for r in rows),
    ]
    floors = [r for r in rows if "matmul_seconds_alone" in r]
    if floors:
        table += [
            "", "Our loops' matrix products, timed alone at the loop's own shapes (the floor if every other op were free):",
            "| loop | dtype | loop seconds | products in the loop | products alone | share of the loop | floor MFU |",
            "|---|---|---|---|---|---|---|",
            *(f"| {r['loop']} | {r['dtype']} | {r['seconds']:.1f} | {r['matmul_seconds_in_loop']:.1f} s "
              f"({r['matmul_calls']:.0f} calls) | {r['matmul_seconds_alone']:.1f} s | "
              f"{r['matmul_seconds_alone'] / r['seconds']:.0%} | {r['matmul_floor_mfu']:.0%} |" for r in floors),
        ]
    settings = {k: getattr(args, k) for k in ("model", "users", "items", "k", "batch_tokens", "floor")}
    return finish(args, {"settings": settings, "peak_gflops": peaks, "rows": rows}, table)


if __name__ == "__main__":
    main()
