"""bench.coordinator on a tiny base: this code's ways each in a fresh process with its own peak RSS, and the old
ways run in this one (the comparison's other side)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.coordinator import SIZES, STEPS, main, run_step, write_zero_model


def test_coordinator_measures_each_step_in_a_fresh_process(tmp_path: Path) -> None:
    results = main(["--size", "tiny", "--ways", "new", "--work", str(tmp_path), "--out", str(tmp_path / "c.json")])
    config = SIZES["tiny"]
    parameters = config.vocab_size * config.hidden_size + config.num_hidden_layers * (
        config.hidden_size * config.hidden_size * 2 + config.hidden_size * 32 * 2  # q, o; k, v (2 heads of 16 each)
        + 3 * config.hidden_size * config.intermediate_size + 2 * config.hidden_size) + config.hidden_size
    assert results["model_bytes"] == 2 * parameters  # bf16, the tied head once
    assert set(results["steps"]) == {f"{step} new" for step in STEPS}
    for figures in results["steps"].values():  # a fresh process each: torch's import alone is above 0.1 GB
        assert figures["seconds"] > 0 and 0.1 < figures["peak_rss_gb"] < 4, figures
    assert json.loads((tmp_path / "c.json").read_text())["steps"] == results["steps"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # the model and its copies are removed


def test_the_old_ways_run_on_the_same_model(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_zero_model(SIZES["tiny"], model_dir)
    for step in STEPS:
        run_step(step, "old", model_dir, tmp_path)
    saved = tmp_path / "saved"  # what resolve_model made before: loaded, saved and hashed
    assert (saved / "model.safetensors").is_file() and (saved / "oppu-model.json").is_file()
