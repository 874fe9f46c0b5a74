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
    # the item rows come with the default item table (a rating task)
    assert set(results["rows"]) == {"base", "oppu", "ref-recent-mean", "ref-median", "ref-constant", "ref-population",
                                    "ref-level-item"}
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
    expected = [sum(p * r for p, r in zip(k["probabilities"], (1, 2, 3, 4, 5))) for node in nodes
                for k in json.loads((run_dir / "clients" / node["user"] / "predictions.json").read_text())["base"]]
    found = results["expected_rating"]["base"]
    assert set(results["expected_rating"]) == {"base", "oppu"} and 1 < found["mean"] < 5
    assert found["mean"] == pytest.approx(sum(expected) / 6)
    assert found["sd"] == pytest.approx((sum((e - found["mean"]) ** 2 for e in expected) / 6) ** 0.5)
    assert results["cpu_seconds_per_user"] > 0
    check_ceiling_rows(run_dir, results["ceiling"])


def check_ceiling_rows(run_dir: Path, ceiling: dict) -> None:
    """The ceiling rows, recomputed by hand from the node stores: offsets from the other users' histories only."""
    from statistics import fmean

    nodes = json.loads((run_dir / "nodes.json").read_text())
    stores = {n["user"]: json.loads((run_dir / "clients" / n["user"] / "data.json").read_text()) for n in nodes}

    def ratings(record: dict) -> list[tuple[str, float]]:
        return [(str(item["id"]), float(item["score"])) for item in record["profile"]]

    errors = {"population": [], "level+item": []}
    for node in (n for n in nodes if n["role"] == "test"):
        history = ratings(stores[node["user"]])
        seen, questions = history[:-3], history[-3:]  # --validation-items 3
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        everyone: list[float] = []
        for other, record in stores.items():
            if other == node["user"]:
                continue
            theirs = ratings(record)
            level = fmean(s for _, s in theirs)
            everyone += [s for _, s in theirs]
            for movie, score in theirs:
                sums[movie] = sums.get(movie, 0.0) + score - level
                counts[movie] = counts.get(movie, 0) + 1
        level = fmean(s for _, s in seen[-32:])
        for movie, gold in questions:
            offset = sums.get(movie, 0.0) / (counts.get(movie, 0) + 5)
            errors["population"].append(abs(min(5, max(1, round(fmean(everyone) + offset))) - gold))
            errors["level+item"].append(abs(min(5, max(1, round(level + offset))) - gold))
    for name, values in errors.items():
        assert ceiling[f"ceiling:{name}"]["mae"] == pytest.approx(fmean(values))
    assert set(ceiling) == {"base", "oppu", "ceiling:population", "ceiling:level+item"}
    assert all(-4 <= row["vs_recent_mean"][1] <= row["vs_recent_mean"][0] <= row["vs_recent_mean"][2] <= 4
               for row in ceiling.values())
