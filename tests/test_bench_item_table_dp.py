"""bench.item_table_dp: the run's item table from every training user's sent vector, read as a run reads it, on the
real MovieLens users (the exact table's rows are the default validation run's report rows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.item_table_dp import main, summed_table
from client.item_statistics import contribution
from common.config import RunConfig
from common.item_table import ItemTable
from common.tasks import get_task
from tests.test_item_statistics import rated


def test_without_dp_the_sum_is_the_exact_table_and_with_it_only_noised_buckets_stay() -> None:
    users = [rated("a", [("hit", 5), ("flop", 1)]), rated("b", [("hit", 4), ("x", 2)])]
    exact = ItemTable.empty()
    for user in users:
        exact = exact.plus(contribution(user, get_task("MovieLens")))
    table = summed_table(users, RunConfig())
    assert np.array_equal(table.counts, exact.counts) and np.allclose(table.ratings, exact.ratings)
    noisy = summed_table(users, RunConfig(item_dp_epsilon=1.0))
    assert noisy.noise_std == pytest.approx(RunConfig(item_dp_epsilon=1.0).item_noise_std())
    assert (noisy.counts[noisy.counts > 0] > 2 * noisy.noise_std).all()


def test_the_bench_prints_the_exact_rows_of_the_default_validation_run(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dp.json"
    results = main(["--epsilons", "5", "--repeats", "1", "--out", str(out)])
    exact = results["exact"]  # what the default validation run's report shows (docs/quality.md, session 35)
    assert exact["ref-population"] == pytest.approx(0.898) and exact["ref-level-item"] == pytest.approx(0.808)
    assert exact["ref-recent-mean"] == pytest.approx(0.906)
    (row,) = results["rows"]
    assert row["epsilon"] == 5.0 and row["clip"] == 3.0
    assert row["noise_std"] == pytest.approx(RunConfig(item_dp_epsilon=5.0).item_noise_std())
    assert len(row["ref-level-item"]) == 1 and 0.0 < row["ref-level-item"][0] < 2.0
    assert json.loads(out.read_text())["rows"][0]["epsilon"] == 5.0
    assert "| 5 | 3 | 2.86 |" in capsys.readouterr().out
