"""bench.engine_pass on Flower's real in-memory link state, at a small size."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from bench.engine_pass import SERVER_IDENTITY, main


def test_engine_pass_times_flowers_pass_and_ours_on_the_same_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in SERVER_IDENTITY:  # the bench sets the process's task identity; this test's process gets it back
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))
    results = main(["--sizes", "120:60,40:40", "--sample", "30", "--out", str(tmp_path / "pass.json")])
    assert [(r["nodes"], r["out"]) for r in results["rows"]] == [(120, 60), (40, 40)]
    for row in results["rows"]:
        assert row["flower_pass_seconds"] > 0 and row["our_pass_seconds"] > 0
        assert row["flower_busy_share"] == row["flower_pass_seconds"] / (row["flower_pass_seconds"] + 0.1)
    assert (tmp_path / "pass.json").exists()
