"""bench.attack on two tiny runs: the attack's figures per configuration, and its AUC and TPR on known scores."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.attack import CANDIDATES, auc_interval, calibrate, main, roc_auc, tpr_at_fpr


def test_auc_and_tpr_on_known_scores() -> None:
    assert roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0 and roc_auc([1.0], [1.0]) == 0.5
    assert roc_auc([1.0, 3.0], [2.0, 0.0]) == 0.75
    assert auc_interval([3.0, 4.0], [1.0, 2.0]) == (1.0, 1.0)  # separated in every resample
    low, high = auc_interval([float(i) for i in range(20)], [float(i) + 0.5 for i in range(20)])
    assert low < 0.5 < high and high - low < 0.5  # one sample of 20 vs 20: chance inside, and not everything
    # an update that lowers everyone's loss a lot outranks another update's member unless calibrated per update
    drops = [(2.0, [0.0, 1.0]), (12.0, [10.0, 11.0])]
    assert roc_auc([m for m, _ in drops], [x for _, o in drops for x in o]) == 0.75
    members, non_members = calibrate(drops)
    assert members == [1.5, 1.5] and non_members == [-0.5, 0.5, -0.5, 0.5] and roc_auc(members, non_members) == 1.0
    negatives = [float(i) for i in range(100)]
    assert tpr_at_fpr([99.5, 98.5, 50.0], negatives) == pytest.approx(1 / 3)  # above the 99th of 100 negatives


def test_attack_bench_attacks_clear_and_secure_runs_side_by_side(tmp_path: Path) -> None:
    results = main(["--num-clients", "2", "--train-clients", "2", "--configs", "none,secure-aggregation",
                    "--run-dir", str(tmp_path), "--", "--task", "LaMP-2M", "--data", "synthetic", "--model",
                    "tiny-random", "--methods", "base", "--rounds", "1", "--batch-tokens", "256",
                    "--task-history", "4"])["configs"]
    assert set(results) == {"none", "secure-aggregation"}
    for name, r in results.items():
        assert r["pairs"] == {"members": 2, "non_members": 4}  # 2 updates x (own user | 2 test users)
        assert 0 <= r["membership_auc"] <= 1 and 0 <= r["membership_auc_uncalibrated"] <= 1 and r["audit_passed"]
        assert 0 <= r["auc_95"][0] <= r["auc_95"][1] <= 1
        assert 0 <= r["canary_exposure"] <= r["canary_exposure_max"] == pytest.approx(6.0)
        assert r["bytes_per_round"] > 0 and r["epsilon"] is None
    assert CANDIDATES == 63
    # SecAgg+ costs messages: 4 stages both ways instead of one request and reply
    assert results["secure-aggregation"]["messages_per_round"] == 4 * results["none"]["messages_per_round"]
