"""The whole default run, measured: wall time, peak memory of the process tree, time and bytes per phase.

    python -m bench.end_to_end                          # flower-simulation --num-clients 100 (the default run)
    python -m bench.end_to_end --num-clients 10 -- --rounds 1   # flags after -- go to flower-simulation

It starts `flower-simulation` as a child process (run directory under runs/bench-e2e-<time> unless given)
and samples every process it starts (driver, Ray's services, client workers) once a second:
- RSS summed over the tree: what `top` shows added up; pages the processes share (the base model's
  safetensors, mapped read-only by every worker) are counted once per process, so it overstates;
- PSS summed over the tree: shared pages split between the processes that map them, i.e. the memory the
  run really occupies.
Phase times come from the run's report.json, bytes per phase from its server-side audit log. Per test user and
phase: the nodes' own timings (means over users). In-run MFU of each personal adapter kind: the work each node
recorded beside its adapters (tokens, seconds) over the matmul peak on the run's device (on a CPU at one thread, a
client's share; measured before and after the run, the higher counts), next to the same training loop alone on
the examples the run's first test node trained on (annotated from the run's item table where it has one) and, on
a CPU, that loop's floor: its matrix products timed alone at their own shapes (`bench.common.matmuls_alone`), the
MFU it would reach if every other op were free.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import torch

from bench.common import finish, load_model, matmul_peak_gflops, matmuls_alone, train_fresh_lora, training_flops
from client.adapters import TRAINING_RECORD
from client.app import personal_user
from client.data import load_oppu
from client.training import history_examples
from common.config import RunConfig
from common.methods import parse_variant
from common.store import UserStore, read_json
from common.tasks import get_task
from server.item_statistics import item_table_path
from simulation.privacy_audit import read_log, traffic

GIB = 2**30


class TreeMemory:
    """Peak RSS and PSS summed over a process and all its descendants, sampled in a background thread.

    Also kept: each process's RSS at the sample where the tree's RSS peaked, and each process's CPU seconds
    when last seen, so a table can say which part of the run (driver, Ray services, client workers) costs what.
    RSS and CPU times are read every `interval`; PSS (the kernel walks each process's page tables: about 60 ms a
    sample over a run's dozen processes, 90x the rest) only when the tree's RSS reaches a new peak or `pss_interval`
    has passed, so that the sampler takes about 1 % of a core from the run it measures, not 6 % (its own CPU
    seconds are kept in `cpu_seconds_self`).
    """

    def __init__(self, pid: int, interval: float = 1.0, pss_interval: float = 30.0) -> None:
        self.root = psutil.Process(pid)
        self.interval, self.pss_interval = interval, pss_interval
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.rss_at_peak: dict[int, tuple[str, int]] = {}  # pid -> (name, RSS bytes)
        self.cpu_seconds: dict[int, tuple[str, float]] = {}  # pid -> (name, user + system seconds)
        self.cpu_seconds_self = 0.0
        self.samples = self.pss_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        last_pss = -math.inf
        while not self._stop.wait(self.interval):
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            sample: dict[int, tuple[str, int]] = {}
            for process in processes:
                try:
                    with process.oneshot():
                        rss, times, name = process.memory_info().rss, process.cpu_times(), process.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                sample[process.pid] = (name, rss)
                self.cpu_seconds[process.pid] = (name, times.user + times.system)
            rss = sum(rss for _, rss in sample.values())
            new_peak = rss > self.peak_rss
            if new_peak or time.monotonic() - last_pss >= self.pss_interval:
                self.peak_pss = max(self.peak_pss, self._pss(processes))
                last_pss, self.pss_samples = time.monotonic(), self.pss_samples + 1
            if new_peak:
                self.peak_rss, self.rss_at_peak = rss, sample
            self.peak_processes = max(self.peak_processes, len(processes))
            self.samples += 1
        self.cpu_seconds_self = time.thread_time()

    @staticmethod
    def _pss(processes: list[psutil.Process]) -> int:
        total = 0
        for process in processes:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def by_name(self) -> dict[str, dict[str, float]]:
        """Per process name: how many, RSS at the tree's peak (GiB) and CPU seconds, largest RSS first."""
        rows: dict[str, dict[str, float]] = {}
        for pid, (name, seconds) in self.cpu_seconds.items():
            row = rows.setdefault(name, {"processes": 0, "rss_at_peak_gib": 0.0, "cpu_seconds": 0.0})
            row["processes"] += 1
            row["cpu_seconds"] += seconds
            row["rss_at_peak_gib"] += self.rss_at_peak.get(pid, (name, 0))[1] / GIB
        return dict(sorted(rows.items(), key=lambda item: -item[1]["rss_at_peak_gib"]))


def run_measured(command: list[str]) -> tuple[int, float, TreeMemory]:
    """Run the command to its end; (exit status, wall seconds, memory peaks)."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    with TreeMemory(process.pid) as memory:
        status = process.wait()
    return status, time.perf_counter() - start, memory


def user_phase_seconds(run_dir: Path) -> dict[str, float]:
    """Mean seconds per test user of each phase a node timed (profile, train-k0, ..., evaluate)."""
    sums: dict[str, float] = {}
    results = [read_json(path) or {} for path in sorted((run_dir / "clients").glob("*/result.json"))]
    for result in results:
        for name, seconds in result.get("timings", {}).items():
            phase = name.removesuffix("-seconds")
            sums[phase] = sums.get(phase, 0.0) + seconds
    return {name: total / len(results) for name, total in sums.items()}


def recorded_training(run_dir: Path) -> dict[str, dict[str, float]]:
    """Per personal-adapter variant, summed over the test users: the training work each node recorded."""
    totals: dict[str, dict[str, float]] = {}
    for path in sorted((run_dir / "clients").glob(f"*/adapters/*/{TRAINING_RECORD}")):
        record = read_json(path) or {}
        if "training" not in record:
            continue
        row = totals.setdefault(record["variant"], {"adapters": 0.0})
        row["adapters"] += 1
        for key, value in record["training"].items():  # the figures client/personalize.py records
            row[key] = row.get(key, 0.0) + value
    return totals


def cpu_peaks_at_one_thread() -> dict[str, float]:
    """This CPU's bf16 and fp32 matmul peaks at one thread (a client's share), GFLOP/s by dtype name."""
    torch.set_num_threads(1)
    return {str(dtype).removeprefix("torch."): matmul_peak_gflops(dtype) for dtype in (torch.bfloat16, torch.float32)}


def in_run_mfu(run_dir: Path, config: dict[str, Any], peaks_before: dict[str, float] | None = None) -> dict[str, Any]:
    """In-run MFU per adapter variant beside the same loop run alone on the first test user, on the run's device
    (a CPU: one thread, a client's share). The peak is measured after the run; with `peaks_before` (measured before
    it, by dtype name) the higher of the two: a shared host's speed drifts by 10 % within an hour."""
    cfg = RunConfig.from_record(config)
    model, tokenizer = load_model(argparse.Namespace(threads=1, model=cfg.model, device=cfg.device), cfg.dtype,
                                  cfg.quantize)  # the base the run's clients trained on
    dtype = str(model.dtype).removeprefix("torch.")
    peak_after = matmul_peak_gflops(model.dtype, model.device.type)
    peak_before = (peaks_before or {}).get(dtype)
    peak = max(peak_after, peak_before or 0.0)
    work = recorded_training(run_dir)
    task = get_task(cfg.task)
    nodes = json.loads((run_dir / "nodes.json").read_text())
    store = next(UserStore(run_dir, n["user"]) for n in nodes if n["role"] == "test")
    # the user exactly as its node trained: its view of the split, the items annotated from the run's item table
    user, _ = personal_user(load_oppu(store.data, task.name)[0], "test", cfg, read_json(item_table_path(run_dir)) or {})
    profile = (read_json(store.profile) or {}).get("profile")  # only the -pag variants' prompts use it
    rows = {}
    for variant, done in work.items():
        method = parse_variant(variant)
        examples = history_examples(user, task, tokenizer,
                                    cfg.prompt_settings(method.k, method.profile, cfg.history_format),
                                    profile if method.profile else None, cfg.max_history or None)
        train_fresh_lora(model, examples[:4], tokenizer.pad_token_id, cfg.personal_training(), cfg.seed)  # warm-up
        train = lambda: train_fresh_lora(model, examples, tokenizer.pad_token_id, cfg.personal_training(), cfg.seed)  # noqa: E731
        alone = train()
        alone_flops = training_flops(model, alone["tokens"], alone["answer_tokens"])
        rows[variant] = {
            **done,
            "in_run_gflops": training_flops(model, done["tokens"], done["answer_tokens"]) / done["seconds"] / 1e9,
            "alone_gflops": alone_flops / alone["seconds"] / 1e9,
            "alone_tokens": alone["tokens"],
        }
        rows[variant]["in_run_mfu"] = rows[variant]["in_run_gflops"] / peak
        rows[variant]["alone_mfu"] = rows[variant]["alone_gflops"] / peak
        if model.device.type == "cpu":  # the profiler's CPU times say nothing of GPU kernels
            floor = matmuls_alone(train)["matmul_seconds_alone"]
            rows[variant].update(floor_seconds=floor, floor_mfu=alone_flops / floor / 1e9 / peak)
    return {"device": model.device.type, "dtype": dtype, "peak_gflops": peak, "peak_gflops_after": peak_after,
            "peak_gflops_before": peak_before, "variants": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=100, help="test users (flower-simulation --num-clients)")
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/bench-e2e-<time>)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("simulation_flags", nargs="*", help="more flower-simulation flags, after --")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or Path("runs") / f"bench-e2e-{datetime.now():%Y%m%d-%H%M%S}"
    executable = Path(sys.executable).with_name("flower-simulation")
    command = [str(executable), "--num-clients", str(args.num_clients), "--run-dir", str(run_dir),
               *args.simulation_flags]
    peaks_before = None if torch.cuda.is_available() else cpu_peaks_at_one_thread()
    status, wall, memory = run_measured(command)
    report = read_json(run_dir / "report.json")
    if status != 0 or report is None:
        raise SystemExit(f"bench.end_to_end: {' '.join(command)} exited {status}; see {run_dir}")
    phases, _ = traffic(read_log(run_dir / "audit" / "server.jsonl")[0])
    results = {
        "command": command, "wall_seconds": wall, "exit_status": status,
        "peak_tree_rss_gib": memory.peak_rss / GIB, "peak_tree_pss_gib": memory.peak_pss / GIB,
        "peak_processes": memory.peak_processes, "processes": memory.by_name(),
        "sampler": {"cpu_seconds": memory.cpu_seconds_self, "samples": memory.samples, "pss_samples": memory.pss_samples},
        "phase_seconds": report["timings"], "phase_bytes": phases,
        "users": report["users"],
        "methods": report["methods"],
        "user_phase_seconds": user_phase_seconds(run_dir),
        "training": in_run_mfu(run_dir, report["config"], peaks_before),
    }
    mfu = results["training"]
    table = [
        f"`{' '.join(command)}`: exit {status}, wall {wall / 60:.1f} min, {report['users']['evaluated']} users evaluated",
        f"peak memory of the process tree ({memory.peak_processes} processes): "
        f"RSS {results['peak_tree_rss_gib']:.2f} GiB, PSS {results['peak_tree_pss_gib']:.2f} GiB",
        "| process | count | RSS at the peak (GiB) | CPU seconds |", "|---|---|---|---|",
        *(f"| {name} | {row['processes']:.0f} | {row['rss_at_peak_gib']:.2f} | {row['cpu_seconds']:.0f} |"
          for name, row in results["processes"].items()),
        f"| (this script's sampler, not in the run) | 1 | – | {memory.cpu_seconds_self:.0f} |",
        "", "| phase | seconds |", "|---|---|",
        *(f"| {name.removesuffix('-seconds')} | {seconds:.0f} |" for name, seconds in report["timings"].items()),
        "", "| phase | bytes down | messages down | bytes up | messages up |", "|---|---|---|---|---|",
        *(f"| {phase} | {s.get('bytes_down', 0):,} | {s.get('messages_down', 0)} | {s.get('bytes_up', 0):,} | "
          f"{s.get('messages_up', 0)} |" for phase, s in phases.items()),
        "", "| per test user | seconds (mean) |", "|---|---|",
        *(f"| {name} | {seconds:.1f} |" for name, seconds in results["user_phase_seconds"].items()),
        "", f"personal training, {mfu['dtype']} on {mfu['device']}, matmul peak {mfu['peak_gflops']:.0f} GFLOP/s"
        f"{' at one thread' if mfu['device'] == 'cpu' else ''} (after the run {mfu['peak_gflops_after']:.0f}"
        f"{'' if mfu['peak_gflops_before'] is None else ', before it ' + format(mfu['peak_gflops_before'], '.0f')}):",
        "| adapter | users | steps | tokens | seconds | in-run GFLOP/s | in-run MFU | alone (first user) MFU "
        "| floor MFU (its matmuls alone) |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {variant} | {row['adapters']:.0f} | {row['steps']:.0f} | {row['tokens']:.0f} | {row['seconds']:.0f} | "
          f"{row['in_run_gflops']:.0f} | {row['in_run_mfu']:.1%} | {row['alone_mfu']:.1%} | "
          f"{format(row['floor_mfu'], '.1%') if 'floor_mfu' in row else '–'} |"
          for variant, row in mfu["variants"].items()),
    ]
    return finish(args, results, table)


if __name__ == "__main__":
    main()
