"""--answer-calibration: the answer quantile of the shared model's methods, picked on the test users' validation
items before personalization (server/calibration.py, client/calibration.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from client.calibration import calibration_errors
from client.data import load_oppu
from client.history import validation_view
from client.item_statistics import annotate
from client.model_build import resolve_model
from client.model_loading import load_base
from client.task_adapter import merge_task_state
from common.config import RunConfig
from common.item_table import ItemTable
from common.metrics import ANSWER_QUANTILES, answer_quantile, decide, quantile_errors
from common.tasks import get_task
from simulation.engine import SimulationOptions, simulate
from simulation.flags import build_parser, run_config_of, user_counts
from simulation.privacy_audit import main as audit_main

LABELS = ["1", "2", "3", "4", "5"]


def test_the_median_rule_answers_at_a_quantile() -> None:
    row = [0.12, 0.2, 0.3, 0.28, 0.1]  # cumulative 0.12, 0.32, 0.62, 0.90, 1.0
    assert [decide(LABELS, row, "median", q) for q in (0.25, 0.3, 0.35, 0.5, 0.6, 0.65, 0.75)] == \
        ["2", "2", "3", "3", "3", "4", "4"]
    assert decide(LABELS, row, "median") == "3"  # the median by default
    assert ANSWER_QUANTILES[0] == 0.25 and ANSWER_QUANTILES[-1] == 0.75 and 0.5 in ANSWER_QUANTILES


def test_quantile_errors_and_the_chosen_quantile_on_values() -> None:
    rows = [[0.12, 0.2, 0.3, 0.28, 0.1], [0.02, 0.1, 0.3, 0.38, 0.2]]  # cumulative .12 .32 .62 .9 1, .02 .12 .42 .8 1
    errors = quantile_errors(LABELS, rows, ["4", "4"])
    # first row: 2 up to q .30, 3 up to .60, 4 above; second row: 3 up to q .40, 4 above
    by_quantile = dict(zip(ANSWER_QUANTILES, errors))
    assert by_quantile[0.25] == pytest.approx((2 + 1) / 2)
    assert by_quantile[0.35] == pytest.approx((1 + 1) / 2)
    assert by_quantile[0.4] == pytest.approx((1 + 1) / 2)
    assert by_quantile[0.5] == by_quantile[0.6] == pytest.approx((1 + 0) / 2)
    assert by_quantile[0.65] == by_quantile[0.75] == pytest.approx(0.0)
    assert answer_quantile(errors) == 0.65  # 0.65-0.75 tie at 0: the one nearest the median
    assert answer_quantile([1.0] * len(ANSWER_QUANTILES)) == 0.5


def test_calibration_runs_for_rating_tasks_read_by_the_median_only() -> None:
    assert RunConfig().calibrates_answers() and RunConfig(rounds=0).calibrates_answers()
    assert not RunConfig(answer_calibration=False).calibrates_answers()
    assert not RunConfig(decision="mean").calibrates_answers()
    assert not RunConfig(task="LaMP-2M").calibrates_answers()
    assert not RunConfig(methods="oppu,oppu+rag").calibrates_answers()  # every method answers at the median
    assert RunConfig(methods="oppu,pag").calibrates_answers()
    assert "answer-calibration" not in RunConfig().task_adaptation_settings()  # the task adapter does not read it
    assert build_parser().parse_args(["--no-answer-calibration"]).answer_calibration is False


def test_a_run_picks_the_quantile_from_the_test_users_validation_items_and_base_answers_at_it(tmp_path: Path) -> None:
    """A real run (tiny model, MovieLens, 3 test and 2 training users, --split validation): the server's pooled
    error per quantile is the mean of what each test user's device computes from the saved task adapter and table
    on its 5 items before the validation questions; the test users' `base` answers at the chosen quantile, `oppu`
    at the median; the audit passes (test users' nodes replied with metric statistics only)."""
    run_dir = tmp_path / "run"
    argv = ["--model", "tiny-random", "--num-clients", "3", "--train-clients", "2", "--rounds", "1", "--methods",
            "base,oppu", "--split", "validation", "--task-history", "4", "--max-history", "4",
            "--run-dir", str(run_dir)]
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = run_config_of(args, parser)
    _, report = simulate(cfg, user_counts(args), SimulationOptions.from_args(args))
    assert report is not None and not report["errors"]
    calibration = report["calibration"]
    assert (calibration["users"], calibration["items"]) == (3, 15)
    base, tokenizer = load_base(resolve_model("tiny-random"), "cpu", cfg.dtype)
    state = load_file(str(run_dir / "server" / "task_adapter" / "adapter_model.safetensors"))
    merged = merge_task_state(base, cfg, {name: tensor.to(torch.float32) for name, tensor in state.items()})
    table = ItemTable.from_config(json.loads((run_dir / "server" / "item_table.json").read_text()))
    task = get_task("MovieLens")
    views = [annotate(validation_view(load_oppu(path, "MovieLens")[0], task, 5), task, table)
             for path in sorted(run_dir.glob("clients/*/data.json")) if json.loads(path.read_text())["role"] == "test"]
    expected = np.mean([calibration_errors(merged, tokenizer, cfg, view)[0] for view in views], axis=0)
    found = [calibration["mae_by_quantile"][f"{q:.2f}"] for q in ANSWER_QUANTILES]
    np.testing.assert_allclose(found, expected, atol=1e-9)
    quantile = calibration["answer_quantile"]
    assert quantile == answer_quantile(found)
    for path in run_dir.glob("clients/*/predictions.json"):
        kept = json.loads(path.read_text())
        for method, rule_quantile in (("base", quantile), ("oppu", 0.5)):
            assert [row["prediction"] for row in kept[method]] == \
                [decide(LABELS, row["probabilities"], "median", rule_quantile) for row in kept[method]]
    assert f"answer at quantile {quantile:.2f}" in (run_dir / "report.md").read_text()
    assert audit_main([str(run_dir)]) == 0
