"""The end-to-end benchmark's sampler sees the memory and CPU time of a process's descendants too."""

from __future__ import annotations

import sys

import psutil

from bench.end_to_end import run_measured

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
