"""The end-to-end benchmark: its sampler sees the memory and CPU time of a process's descendants too; its loop alone
trains what the run's first test node trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

from bench.end_to_end import run_measured
from client.adapters import TRAINING_RECORD
from simulation.cli import main

HOLD_300_MIB_IN_A_GRANDCHILD = (
    "import subprocess, sys; subprocess.run([sys.executable, '-c', "
    "\"import time; block = bytearray(300 * 2**20); start = time.process_time()\\n"
    "while time.process_time() - start < 0.6: pass\\ntime.sleep(2.5)\"], check=True)"
)


def test_tree_memory_counts_a_grandchilds_allocation():
    status, seconds, memory = run_measured([sys.executable, "-c", HOLD_300_MIB_IN_A_GRANDCHILD])
    assert status == 0 and seconds >= 2.5
    assert memory.peak_processes >= 2
    assert memory.peak_rss >= 300 * 2**20
    assert 300 * 2**20 <= memory.peak_pss <= memory.peak_rss
    python = memory.by_name()[psutil.Process().name()]  # the child and grandchild run the same interpreter
    assert python["processes"] >= 2
    assert python["rss_at_peak_gib"] >= 300 / 1024
    assert python["cpu_seconds"] >= 0.6  # the grandchild's busy loop


def test_tree_memory_reads_pss_at_new_rss_peaks_only_between_its_slow_interval() -> None:
    """The 300 MiB allocation is a new RSS peak (PSS read there, so its peak is seen); the flat seconds after it
    are not, and with a long `pss_interval` their samples read only the cheap RSS."""
    from bench.end_to_end import TreeMemory

    process = subprocess.Popen([sys.executable, "-c", "import time; block = bytearray(300 * 2**20); "
                                "block[::4096] = b'x' * len(block[::4096]); time.sleep(3)"])
    with TreeMemory(process.pid, interval=0.1, pss_interval=60.0) as memory:
        process.wait()
    assert memory.peak_pss >= 300 * 2**20
    assert memory.samples >= 20 and 1 <= memory.pss_samples <= memory.samples // 3
    assert 0 < memory.cpu_seconds_self < 2


def test_the_alone_loop_trains_on_the_examples_the_first_test_node_trained_on(tmp_path: Path) -> None:
    """Under --item-statistics a node trains on its items annotated with the other users' ratings (longer prompts);
    the benchmark's loop alone must train the same tokens, or its MFU is another workload's."""
    from bench.end_to_end import in_run_mfu

    run_dir = tmp_path / "run"
    assert main(["--task", "MovieLens", "--data", "default", "--model", "tiny-random", "--num-clients", "1",
                 "--train-clients", "8", "--train-per-round", "2", "--rounds", "1", "--methods", "oppu,oppu+rag",
                 "--task-history", "4", "--max-history", "16", "--item-statistics", "--run-dir", str(run_dir)]) == 0
    config = json.loads((run_dir / "report.json").read_text())["config"]
    first = next(n["user"] for n in json.loads((run_dir / "nodes.json").read_text()) if n["role"] == "test")
    recorded = {record["variant"]: record["training"]["tokens"] for record in (
        json.loads(path.read_text()) for path in (run_dir / "clients" / first / "adapters").glob(f"*/{TRAINING_RECORD}"))}
    mfu = in_run_mfu(run_dir, config, peaks_before={"bfloat16": 1e6, "float32": 1e6})
    assert set(mfu["variants"]) == set(recorded) == {"k0", "k1"}
    assert all(mfu["variants"][v]["alone_tokens"] == recorded[v] for v in recorded)
    assert mfu["peak_gflops"] == mfu["peak_gflops_before"] == 1e6 > mfu["peak_gflops_after"] > 0  # the higher one
