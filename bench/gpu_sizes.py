"""Personal LoRA training at the sizes users run on a GPU: randomly initialised Llama-architecture models of about 1B
and 7B parameters built from a config on the GPU (no weights to carry; random weights cost the same memory and time),
in bf16 and in 4-bit NF4 (QLoRA), plus the error of merging a task LoRA into a 4-bit base on the real model.

    python -m bench.gpu_sizes --out runs/bench/gpu_sizes.json            # 1b and 7b, bf16 and nf4
    python -m bench.gpu_sizes --sizes 1b --quantize none --steps 5

Per size and quantization: GPU memory of the model, peak GPU memory of one client training its LoRA (r=8 on q,v,
`--batch-tokens` per step, `client.training.train_adapter`), how many such clients fit on this GPU at once
(its memory over that peak plus `CONTEXT_GIB` of CUDA context each), tokens/s and MFU against the bf16 matmul peak
this script measures. `merge` (on `--model`, default SmolLM2, with a task LoRA of non-zero B): the largest logit
error of the task-adapted 4-bit base against the unmerged adapter, for our merge into a dequantized copy and for
peft's merge into the 4-bit weights. Needs CUDA (and bitsandbytes for nf4); says so and exits 2 without.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import finish, machine, matmul_peak_gflops
from client.adapters import attach_fresh
from client.training import Example, train_adapter
from common.config import PeftSettings, TrainingSettings

CONTEXT_GIB = 0.5  # CUDA context and allocator slack of one more process on the GPU (not in torch's counters)
SIZES = {  # Llama-3.2-1B's and Llama-2-7B's shapes
    "1b": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
}
GIB = 2**30


def random_model(config: LlamaConfig, quantize: str) -> nn.Module:
    """The model built on the GPU in bf16 from `config`; with nf4 every decoder linear becomes a bitsandbytes
    Linear4bit holding the quantized random weights (the vocabulary head stays bf16, as transformers keeps it)."""
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    if quantize == "nf4":
        import bitsandbytes as bnb

        head = model.get_output_embeddings()
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and module is not head:
                layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4").to("cuda")
                model.set_submodule(name, layer)
                del module
        model.is_loaded_in_4bit = True  # as transformers' 4-bit loader marks it: peft then wraps its 4-bit LoRA layers
        torch.cuda.empty_cache()
    return model.eval().requires_grad_(False)


def decoder_weights(model: nn.Module) -> int:
    """Weights of the decoder's linear layers (a 4-bit layer's packed tensor holds two per byte)."""
    head = model.get_output_embeddings()
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m is not head)


def measure_size(name: str, quantize: str, batch_tokens: int, steps: int, peak_tflops: float) -> dict[str, Any]:
    """Memory, clients per GPU, tokens/s and MFU of one client's personal LoRA training at this size."""
    gc.collect()  # an earlier size's model, held in a reference cycle, would count in this one's memory
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = random_model(SIZES[name], quantize)
    built = time.perf_counter() - start
    model_bytes = torch.cuda.memory_allocated()
    rng = random.Random(0)
    length, answer = 256, 4
    examples = [Example([rng.randrange(1000, 30000) for _ in range(length - answer)], [rng.randrange(1000, 30000)
                for _ in range(answer)]) for _ in range(max(1, batch_tokens // length) * (steps + 1))]
    peft_model = attach_fresh(model, PeftSettings(), "bench", 0)
    settings = TrainingSettings(epochs=1.0, lr=1e-4, max_batch_tokens=batch_tokens)
    train_adapter(peft_model, examples[: max(1, batch_tokens // length)], 0, settings, seed=0)  # warm-up step
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = train_adapter(peft_model, examples[max(1, batch_tokens // length):], 0, settings, seed=1)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    flops = 4.0 * decoder_weights(model) * result["tokens"] + 4.0 * model.get_output_embeddings().weight.numel() * (
        answer * len(examples[max(1, batch_tokens // length):]))
    achieved = flops / result["seconds"] / 1e12
    total = torch.cuda.get_device_properties(0).total_memory
    del peft_model, model
    torch.cuda.empty_cache()
    return {
        "size": name, "quantize": quantize, "parameters_b": round(sum_params(SIZES[name]) / 1e9, 2),
        "build_seconds": round(built, 1), "model_gib": round(model_bytes / GIB, 2),
        "client_peak_gib": round(peak / GIB, 2),
        "clients_per_gpu": int(total / GIB // (peak / GIB + CONTEXT_GIB)),
        "steps": result["steps"], "tokens_per_second": round(result["tokens"] / result["seconds"]),
        "tflops": round(achieved, 1), "mfu": round(achieved / peak_tflops, 3),
    }


def sum_params(config: LlamaConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def merge_error(model_name: str) -> dict[str, float]:
    """Largest logit error against the unmerged task LoRA on the 4-bit base: ours (merge into a dequantized copy,
    client/quantize.py) and peft's merge into the 4-bit weights."""
    from client.adapters import load_adapter_state
    from client.model_build import resolve_model
    from client.model_loading import load_base, load_fresh
    from client.task_adapter import initial_task_state, remove_adapters, task_adapted_base, task_lora
    from common.config import RunConfig

    cfg = RunConfig(model=model_name, device="cuda", dtype="bfloat16", quantize="nf4")
    model_dir = resolve_model(model_name)
    base, tokenizer = load_base(model_dir, "cuda", "bfloat16", "nf4")
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in initial_task_state(base, cfg).items()}
    ids = tokenizer("Rate the movie Toy Story (1995); Animation, Children's, Comedy. Answer:", return_tensors="pt")
    ids = ids["input_ids"].to("cuda")
    unmerged = attach_fresh(base, task_lora(cfg), "task", 0)
    load_adapter_state(unmerged, "task", state)
    with torch.no_grad():
        expected = unmerged(input_ids=ids).logits.float()
    remove_adapters(unmerged)
    requantized = attach_fresh(load_fresh(model_dir, "cuda", "bfloat16", "nf4"), task_lora(cfg), "task", 0)
    load_adapter_state(requantized, "task", state)
    requantized = requantized.merge_and_unload()
    merged = task_adapted_base(model_dir, "cuda", cfg, state, "bench-merge")
    with torch.no_grad():
        ours = (merged(input_ids=ids).logits.float() - expected).abs().max().item()
        peft_4bit = (requantized(input_ids=ids).logits.float() - expected).abs().max().item()
        lora_effect = (base(input_ids=ids).logits.float() - expected).abs().max().item()
    return {"dequantized_copy": round(ours, 4), "into_4bit_weights": round(peft_4bit, 4),
            "task_lora_effect": round(lora_effect, 4)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench.gpu_sizes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1b,7b", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--quantize", default="none,nf4", help="comma-separated: none (bf16), nf4")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per training step (256-token rows)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per size")
    parser.add_argument("--model", default="smollm2", help="the real model the merge error is measured on ('' skips)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_sizes: needs a CUDA GPU, and none is visible here", file=sys.stderr)
        raise SystemExit(2)
    args.out = Path(args.out) if args.out else None
    peak = matmul_peak_gflops(torch.bfloat16, "cuda") / 1e3
    rows = []
    for name in filter(None, args.sizes.split(",")):
        for quantize in filter(None, args.quantize.split(",")):
            rows.append(measure_size(name, quantize, args.batch_tokens, args.steps, peak))
            print(rows[-1], flush=True)
    merge = merge_error(args.model) if args.model and "nf4" in args.quantize else None
    table = [f"{machine()['cuda']}: bf16 matmul peak {peak:.0f} TFLOP/s (measured); LoRA r=8 on q,v, "
             f"{args.batch_tokens} tokens per step",
             "| size | weights | model GiB | client peak GiB | clients per GPU | tokens/s | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['size']} ({r['parameters_b']}B) | {r['quantize']} | {r['model_gib']} | {r['client_peak_gib']} | "
              f"{r['clients_per_gpu']} | {r['tokens_per_second']} | {r['tflops']} | {r['mfu']:.1%} |" for r in rows]
    if merge:
        table.append(f"task LoRA merged into a 4-bit {args.model}: largest logit error vs unmerged {merge}")
    return finish(args, {"command": argv, "peak_tflops": peak, "rows": rows, "merge_error": merge}, table)


if __name__ == "__main__":
    main()
