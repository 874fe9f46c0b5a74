"""What the coordinator of a run holds for a large base: the model resolved into the cache from a local directory,
the first task LoRA seeded, and the model's files streamed to nodes that lack them. Each step runs in a fresh
process (its own peak RSS), beside the way the code did it before session 40 (load and save; a float32 copy of
the base; every chunk read into a list first).

    python -m bench.coordinator --size 1b                  # every step, both ways
    python -m bench.coordinator --size 8b --ways new       # an 8B base: the old ways need about 17, 32 and 16 GB

The base is a Llama-architecture directory of zero bf16 weights written shard by shard from its config (no model is
built in memory), so a size that does not fit in memory still fits on disk (an 8B one: 16 GB, twice with the cache's
copy). It is written under --work and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from bench import gpu_sizes
from bench.common import finish
from client.model_build import resolve_model
from client.model_loading import load_fresh, load_weightless
from client.task_adapter import initial_task_state
from common.config import RunConfig
from common.model_files import write_manifest
from server.distribution import model_chunks

SIZES = {  # Llama-3.2-1B's shape (bench.gpu_sizes'), Llama-3-8B's, and a tiny one for the test
    "tiny": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    "1b": gpu_sizes.SIZES["1b"],
    "8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
}
SHARD_BYTES = 2 * 2**30
STEPS = ("resolve", "seed", "send")
GB = 1e9


def write_zero_model(config: LlamaConfig, directory: Path) -> int:
    """A model directory of zero bf16 weights in shards of at most SHARD_BYTES, with SmolLM2's tokenizer; its bytes."""
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    shards: list[dict[str, torch.Size]] = [{}]
    for name, shape in shapes.items():
        if shards[-1] and (sum(s.numel() for s in shards[-1].values()) + shape.numel()) * 2 > SHARD_BYTES:
            shards.append({})
        shards[-1][name] = shape
    weight_map = {}
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in shard.items()},
                  str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(s.numel() for s in shapes.values()) * 2
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model("smollm2")).save_pretrained(directory)
    return total


def peak_rss_bytes() -> int:
    """This process image's peak RSS (VmHWM: getrusage's maxrss would start at the parent's, kept across exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def run_step(step: str, way: str, model_dir: Path, work: Path) -> None:
    """One step one way in this process."""
    if step == "resolve" and way == "new":
        resolve_model(str(model_dir), work / "cache")
    elif step == "resolve":  # what resolve_model did before: load, save, hash
        (work / "saved").mkdir()
        AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(work / "saved")
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(work / "saved")
        write_manifest(work / "saved", str(model_dir))
    elif step == "seed":
        base = load_weightless(model_dir) if way == "new" else load_fresh(model_dir, "cpu", "float32")
        initial_task_state(base, RunConfig(model=str(model_dir)))
    elif way == "new":
        for _ in model_chunks(model_dir):
            pass
    else:
        list(model_chunks(model_dir))


def measure(step: str, way: str, model_dir: Path, work: Path) -> dict[str, float]:
    """Seconds and peak RSS of one step in a fresh process (imports not counted)."""
    done = subprocess.run([sys.executable, "-m", "bench.coordinator", "--step", step, "--way", way,
                           "--model-dir", str(model_dir), "--work", str(work)], capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    shutil.rmtree(work / "cache", ignore_errors=True)
    shutil.rmtree(work / "saved", ignore_errors=True)
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b", help="the base's shape")
    parser.add_argument("--ways", choices=("both", "new"), default="both",
                        help="'new': this code's ways only (the old ones need the base's size in memory, or twice it)")
    parser.add_argument("--work", type=Path, default=None, help="where the model is written (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one measured step (a child process)
    parser.add_argument("--way", choices=("new", "old"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        start = time.perf_counter()
        run_step(args.step, args.way, args.model_dir, args.work)
        peak = peak_rss_bytes() / GB
        print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "peak_rss_gb": round(peak, 2)}))
        return {}
    work = Path(tempfile.mkdtemp(prefix="coordinator-", dir=args.work))
    try:
        model_dir = work / "model"
        model_dir.mkdir()
        start = time.perf_counter()
        size = write_zero_model(SIZES[args.size], model_dir)
        print(f"wrote {size / GB:.1f} GB of zero bf16 weights in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        ways = ("new", "old") if args.ways == "both" else ("new",)
        steps = {f"{step} {way}": measure(step, way, model_dir, work) for step in STEPS for way in ways}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = [f"{args.size} base ({size / GB:.1f} GB in bf16), each step in a fresh process:",
             "| step | way | seconds | peak RSS GB |", "|---|---|---|---|"]
    for name, figures in steps.items():
        step, way = name.split()
        peak = figures.get("peak_rss_gb", figures.get("error"))
        table.append(f"| {step} | {way} | {figures.get('seconds', '-')} | {peak} |")
    return finish(args, {"size": args.size, "model_bytes": size, "steps": steps}, table)


if __name__ == "__main__":
    main()
