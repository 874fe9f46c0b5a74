"""bench.task_ceiling on the tiny model: the curve's steps and values, the no-LLM rows, and the JSON it leaves."""

from __future__ import annotations

import json
import math

import pytest

from bench.item_knowledge import ceiling_rows
from bench.task_ceiling import main
from client.data import load_movielens
from client.history import validation_view
from client.partition import split_users
from client.references import RECENT_MEAN, reference_predictions
from common.config import RunConfig, UserCounts
from common.tasks import get_task


def test_curve_and_reference_rows(tiny, tmp_path):
    out = tmp_path / "ceiling.json"
    results = main(["--model", "tiny-random", "--device", "cpu", "--num-clients", "3", "--users", "4",
                    "--items-per-user", "4", "--eval-every", "2", "--max-steps", "5", "--out", str(out)])
    curve = results["curve"]
    assert [p["step"] for p in curve] == [0, 2, 4, 5]  # step 0, every 2nd step, and the last one
    assert curve[0]["loss"] is None and curve[0]["examples"] == curve[0]["tokens"] == 0
    assert all(math.isfinite(p["loss"]) and p["loss"] > 0 for p in curve[1:])
    assert all(0 <= p["mae"] <= 4 and p["sd"] >= 0 for p in curve)
    assert [p["examples"] for p in curve] == sorted(p["examples"] for p in curve) and curve[-1]["tokens"] > 0
    assert results["training"]["users"] == 4 and results["training"]["examples"] == 4 * (5 + 4)  # queries + items
    assert results["questions"] == 3 * 5  # a run's --validation-items

    task = get_task("MovieLens")
    users = load_movielens()
    tests, _ = split_users(users, UserCounts(3, 0), RunConfig())
    views = [validation_view(u, task, 5) for u in tests]
    outside = [u for u in users if u not in tests]
    refs = results["references"]
    assert refs["all outside"] == ceiling_rows(views, outside, 0)
    assert refs["training data"] == ceiling_rows(views, split_users(users, UserCounts(3, 4), RunConfig())[1], 4)
    recent = [abs(float(a) - float(q.gold)) for v in views
              for a, q in zip(reference_predictions(task, v)[RECENT_MEAN], v.queries)]
    assert refs[RECENT_MEAN] == pytest.approx(sum(recent) / len(recent))

    assert json.loads(out.read_text())["curve"] == curve
    assert not any("lora" in name for name, _ in tiny[0].named_modules())  # the shared base is left clean


def test_bad_counts_are_refused():
    with pytest.raises(SystemExit):
        main(["--eval-every", "0"])
