"""bench.coordinator on a tiny base: every step both ways, each in a fresh process with its own peak RSS."""

from __future__ import annotations

import json
from pathlib import Path

from bench.coordinator import SIZES, main


def test_coordinator_measures_each_step_both_ways(tmp_path: Path) -> None:
    results = main(["--size", "tiny", "--work", str(tmp_path), "--out", str(tmp_path / "coordinator.json")])
    config = SIZES["tiny"]
    parameters = config.vocab_size * config.hidden_size + config.num_hidden_layers * (
        config.hidden_size * config.hidden_size * 2 + config.hidden_size * 32 * 2  # q, o; k, v (2 heads of 16 each)
        + 3 * config.hidden_size * config.intermediate_size + 2 * config.hidden_size) + config.hidden_size
    assert results["model_bytes"] == 2 * parameters  # bf16, the tied head once
    assert set(results["steps"]) == {f"{step} {way}" for step in ("resolve", "seed", "send") for way in ("new", "old")}
    for figures in results["steps"].values():  # a fresh process each: torch's import alone is above 0.1 GB
        assert figures["seconds"] > 0 and 0.1 < figures["peak_rss_gb"] < 4, figures
    assert json.loads((tmp_path / "coordinator.json").read_text())["steps"] == results["steps"]
    assert [p.name for p in tmp_path.iterdir()] == ["coordinator.json"]  # the model and its copies are removed
