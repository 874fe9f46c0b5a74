"""bench.quality on a tiny validation run: rows, CIs and the decision rules re-read from the node stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.quality import main
from common.metrics import decide, finalize, statistics
from common.tasks import get_task


def test_quality_bench_reports_references_and_recomputes_every_rule(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    results = main(["--num-clients", "2", "--run-dir", str(run_dir), "--", "--model", "tiny-random",
                    "--train-clients", "2", "--rounds", "1", "--methods", "base,oppu", "--validation-items", "3"])
    task = get_task("MovieLens")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"]["split"] == "validation" and report["decision_rule"] == "median"
    assert set(results["rows"]) == {"base", "oppu", "ref-recent-mean", "ref-median", "ref-constant"}
    assert all(row["queries"] == 6 for row in results["rows"].values())  # 2 users x 3 validation items
    nodes = [n for n in json.loads((run_dir / "nodes.json").read_text()) if n["role"] == "test"]
    for rule in ("argmax", "median", "mean"):
        predictions, golds = [], []
        for node in nodes:
            kept = json.loads((run_dir / "clients" / node["user"] / "predictions.json").read_text())["oppu"]
            assert all(k["id"].startswith("val-") for k in kept)  # the test queries were not evaluated
            predictions += [decide(task.labels, k["probabilities"], rule) for k in kept]
            golds += [k["gold"] for k in kept]
        assert results["rules"]["oppu"][rule] == pytest.approx(finalize(task, statistics(task, predictions, golds))["mae"])
    assert results["rules"]["oppu"]["median"] == pytest.approx(results["rows"]["oppu"]["metrics"]["mae"])
    assert results["cpu_seconds_per_user"] > 0
