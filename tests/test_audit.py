"""The privacy audit on real simulation runs: an honest run passes, a leaky client is caught by name."""

from __future__ import annotations

import json
from pathlib import Path

import cloudpickle
import pytest

from client.config import RunConfig
from simulation.audit import main as audit_main
from simulation.cli import build_parser, simulate

ARGS = [
    "--num-clients", "2", "--train-clients", "2", "--rounds", "1", "--methods", "base,oppu", "--canaries",
    "--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--batch-tokens", "256",
    "--personal-epochs", "1", "--max-history", "8", "--task-history", "4",
]


def _run(run_dir: Path, client_app=None) -> Path:
    args = build_parser().parse_args([*ARGS, "--run-dir", str(run_dir)])
    cfg = RunConfig(**{k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__})
    simulate(args, cfg, client_app)
    return run_dir


def test_honest_run_passes_the_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run(tmp_path / "honest")
    assert audit_main([str(run_dir)]) == 0
    summary = json.loads((run_dir / "audit" / "summary.json").read_text())
    assert summary["passed"] and summary["canaries_planted"] == 4
    assert summary["personal_adapters_checked"] == 2
    assert set(summary["phases"]) == {"announce", "adapt", "personalize"}
    # the adapt phase carries the task LoRA both ways; personalize replies are small metric records
    assert summary["phases"]["adapt"]["bytes_up"] > 5 * summary["phases"]["personalize"]["bytes_up"]
    assert summary["messages"]["server"] == summary["messages"]["client"]
    lines = [json.loads(x) for x in (run_dir / "audit" / "server.jsonl").read_text().splitlines()]
    train = next(e for e in lines if e["message_type"] == "train" and e["direction"] == "out")
    assert train["round"] == 1 and train["records"]["arrays"]["tensors"][0]["dtype"] == "float32"
    assert "audit passed" in capsys.readouterr().out


def test_leaky_client_fails_the_audit_naming_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import leaky_client

    cloudpickle.register_pickle_by_value(leaky_client)  # Ray workers cannot import from tests/

    run_dir = _run(tmp_path / "leaky", leaky_client.leaky_app)
    assert audit_main([str(run_dir)]) == 1
    summary = json.loads((run_dir / "audit" / "summary.json").read_text())
    leaks = summary["checks"]["personal-tensors-and-keys"]["violations"]
    assert any("evaluate message" in v and "equals a personal adapter tensor" in v for v in leaks)
    assert any("carries tensors" in v for v in leaks)
    assert any("config keys not allowed in a reply: ['note']" in v for v in leaks)
    canaries = summary["checks"]["canaries"]["violations"]
    assert len(canaries) >= 2 and all("evaluate message" in v for v in canaries)
    assert "audit FAILED" in capsys.readouterr().out
