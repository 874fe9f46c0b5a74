"""bench.flwr_run: a real `flwr run` on its own local SuperLink, with the tiny model and synthetic users."""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from bench.flwr_run import main

RUN_CONFIG = ("num-clients=2 train-clients=2 model='tiny-random' data='synthetic' task='LaMP-2M' rounds=1 "
              "methods='base,oppu' max-history=8 task-history=4")


def test_flwr_run_bench_times_the_phases_and_the_processes_and_stops_its_superlink(tmp_path: Path) -> None:
    results = main(["--run-config", RUN_CONFIG, "--federation-config", "client-resources-num-cpus=1",
                    "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "flwr.json")])
    assert results["command"][-1] == "num-supernodes=4 client-resources-num-cpus=1"
    assert {"announce-seconds", "task-adaptation-seconds", "personalize-seconds"} <= set(results["timings"])
    assert 0 < sum(results["timings"].values()) < results["wall_seconds"]
    assert results["cpu_seconds"]["flwr-simulation"] > 0 and results["cpu_seconds"]["workers"] > 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["methods"]["oppu"]["users"] == 2
    assert json.loads((tmp_path / "flwr.json").read_text())["wall_seconds"] == results["wall_seconds"]
    assert not [p for p in psutil.process_iter(["cmdline"])  # its SuperLink is stopped
                if any("bench-flwr-home-" in part for part in p.info["cmdline"] or [])]
