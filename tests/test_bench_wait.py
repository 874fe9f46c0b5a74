"""bench.driver_wait on a tiny run: the driver's CPU while it waits for personalization, read from its console, and
how late messages were handled, read from its audit logs."""

from __future__ import annotations

import json
from pathlib import Path

from bench.driver_wait import main


def test_driver_wait_measures_the_personalization_phase(tmp_path: Path) -> None:
    results = main(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "wait.json"), "--",
                    "--model", "tiny-random", "--num-clients", "2", "--methods", "base,oppu", "--personal-epochs", "8"])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["users"]["evaluated"] == 2
    # the window spans personalization (and the report's writing), so it is at least the phase the server timed
    assert results["wait_seconds"] >= 0.8 * report["timings"]["personalize-seconds"]
    assert 0 <= results["driver_cpu_seconds"] <= 2 * results["wait_seconds"]  # 2 cores at most
    assert json.loads((tmp_path / "wait.json").read_text())["driver_share"] == results["driver_share"]
    # Ray's own services were found and measured beside it (the workers are not among them)
    assert {"gcs_server", "raylet"} <= set(results["ray_services"])
    assert not any("ClientAppActor" in name for name in results["ray_services"])
    assert 0.8 * report["timings"]["personalize-seconds"] <= results["ray_window_seconds"] <= results["wait_seconds"]
    assert 0 <= results["ray_services_cpu_seconds"] <= 2 * results["ray_window_seconds"]
    assert results["ray_services_share"] == results["ray_services_cpu_seconds"] / results["ray_window_seconds"]
    # every reply (announce, model, the round, calibration, personalization) read at once: the server's wait ends
    # when the engine stores a reply (simulation/waiting.py); the one round's 2 updates ran on the 2 workers at once
    assert results["replies"] >= 6 + 2 + 2 + 2 + 2 and results["reply_delay_max"] < 0.5
    assert results["rounds"] == 1 and results["round_workers"] == 2
    assert 0 <= results["round_start_delay_mean"] == results["round_start_delay_max"] < 0.5
    assert 0 <= results["round_idle_share"] < 0.5 and results["round_updates"] == 2
    # an update runs inside its round (a worker's first one also imports torch: an announce no longer does)
    assert 0 < results["round_update_seconds_mean"] < report["timings"]["task-adaptation-seconds"]
    analysed = main(["--analyse", str(tmp_path / "run")])
    assert analysed.pop("machine") == results["machine"]
    assert analysed == {"run_dir": str(tmp_path / "run"), **{
        k: results[k] for k in ("replies", "reply_delay_mean", "reply_delay_max", "rounds", "round_start_delay_mean",
                                "round_start_delay_max", "round_workers", "round_updates", "round_update_seconds_mean",
                                "round_idle_share")}}
