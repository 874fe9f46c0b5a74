"""The privacy audit on real simulation runs: an honest run (also a resumed one) passes; a leaky client and every
kind of one-sided log tampering are caught by name.

One honest and one leaky run are shared by the module; each test audits and tampers with its own copy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import pytest

from common import protocol as p
from common.config import RunConfig
from simulation.engine import SimulationOptions, simulate
from simulation.flags import build_parser, user_counts
from simulation.privacy_audit import main as audit_main

ARGS = [
    "--num-clients", "2", "--train-clients", "2", "--rounds", "1", "--methods", "base,oppu", "--canaries",
    "--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--batch-tokens", "256",
    "--personal-epochs", "1", "--max-history", "8", "--task-history", "4",
]


def _run(run_dir: Path, client_app=None, resume: bool = False) -> Path:
    args = build_parser().parse_args([*ARGS, "--run-dir", str(run_dir), *(["--resume"] if resume else [])])
    cfg = RunConfig(**{k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__})
    simulate(cfg, user_counts(args), SimulationOptions.from_args(args), client_app)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "audit" / "summary.json").read_text())


def _entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _edit_lines(path: Path, edit: Callable[[list[str]], list[str]]) -> None:
    path.write_text("".join(f"{line}\n" for line in edit(path.read_text().splitlines())))


def _keep(path: Path, wanted: Callable[[dict], bool]) -> None:
    """Delete the lines of `path` whose entry is not `wanted`."""
    _edit_lines(path, lambda lines: [line for line in lines if wanted(json.loads(line))])


def _first(path: Path, direction: str, message_type: str) -> dict:
    return next(e for e in _entries(path) if e["direction"] == direction and e["message_type"] == message_type)


def _drop_line(path: Path, direction: str, message_id: str) -> None:
    _keep(path, lambda e: not (e["direction"] == direction and e["message_id"] == message_id))


def _drop_first(path: Path, direction: str, message_type: str) -> None:
    _drop_line(path, direction, _first(path, direction, message_type)["message_id"])


def _cut_fifth_line_in_half(lines: list[str]) -> list[str]:
    return [*lines[:4], lines[4][: len(lines[4]) // 2], *lines[5:]]


def _alter_hash(path: Path) -> None:
    entry = _first(path, "in", p.ADAPT)
    altered = json.dumps({**entry, "content_sha256": "0" * 64})
    _edit_lines(path, lambda lines: [altered if json.loads(line) == entry else line for line in lines])


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("runs") / "honest")


@pytest.fixture(scope="module")
def leaky_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import leaky_client

    cloudpickle.register_pickle_by_value(leaky_client)  # Ray workers cannot import from tests/
    return _run(tmp_path_factory.mktemp("runs") / "leaky", leaky_client.leaky_app)


@pytest.fixture(scope="module")
def resumed_run(honest_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The honest run as if killed right after the first personalize reply left its client, then --resume'd.

    Both logs are cut where a kill at that moment cuts them (lines are single appends, in time order), which
    leaves that reply sent and never received; the second attempt is a real resumed run.
    """
    run_dir = _copy(honest_run, tmp_path_factory.mktemp("runs"))
    killed_at = _first(run_dir / "audit" / "client.jsonl", "out", p.PERSONALIZE)["time"]
    for side in ("server", "client"):
        _keep(run_dir / "audit" / f"{side}.jsonl", lambda e: e["time"] <= killed_at)
    return _run(run_dir, resume=True)


def test_honest_run_passes_the_audit(
    honest_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy(honest_run, tmp_path)
    assert audit_main([str(run_dir)]) == 0
    summary = _summary(run_dir)
    assert summary["passed"] and summary["canaries_planted"] == 4
    assert summary["personal_adapters_checked"] == 2
    assert set(summary["checks"]) == {"logs-whole", "personal-tensors-and-keys", "canaries", "logs-agree",
                                      "updates-masked", "test-users-send-metrics-only"}
    assert len(summary["attempts"]) == 1 and summary["sent_not_received_in_interrupted_attempts"] == 0
    assert set(summary["phases"]) == {"announce", "adapt", "personalize"}
    # the adapt phase carries the task LoRA both ways; personalize replies are small metric records
    assert summary["phases"]["adapt"]["bytes_up"] > 5 * summary["phases"]["personalize"]["bytes_up"]
    assert summary["messages"]["server"] == summary["messages"]["client"]
    train = _first(run_dir / "audit" / "server.jsonl", "out", p.ADAPT)
    assert train["round"] == 1 and train["records"]["arrays"]["tensors"][0]["dtype"] == "float32"
    assert "audit passed" in capsys.readouterr().out


def test_leaky_client_fails_the_audit_naming_the_message(
    leaky_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy(leaky_run, tmp_path)
    assert audit_main([str(run_dir)]) == 1
    summary = _summary(run_dir)
    leaks = summary["checks"]["personal-tensors-and-keys"]["violations"]
    assert any(f"{p.PERSONALIZE} message" in v and "equals a personal adapter tensor" in v for v in leaks)
    assert any("carries tensors" in v for v in leaks)
    assert any("config keys not allowed in a reply: ['note']" in v for v in leaks)
    canaries = summary["checks"]["canaries"]["violations"]
    assert len(canaries) >= 2 and all(f"{p.PERSONALIZE} message" in v for v in canaries)
    assert "audit FAILED" in capsys.readouterr().out


def test_leak_is_caught_in_the_server_log_when_the_client_lines_are_deleted(leaky_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(leaky_run, tmp_path)
    _keep(run_dir / "audit" / "client.jsonl", lambda e: (e["direction"], e["message_type"]) != ("out", p.PERSONALIZE))
    assert audit_main([str(run_dir)]) == 1
    checks = _summary(run_dir)["checks"]
    leaks = checks["personal-tensors-and-keys"]["violations"]
    assert leaks and all("server.jsonl" in v and f"server in {p.PERSONALIZE} message" in v for v in leaks)
    assert any("equals a personal adapter tensor" in v for v in leaks)
    assert any("config keys not allowed in a reply: ['note']" in v for v in leaks)
    assert any(f"server in {p.PERSONALIZE} message" in v for v in checks["canaries"]["violations"])
    assert sum("received, but the client log has no 'out' line" in v for v in checks["logs-agree"]["violations"]) == 2


TAMPERINGS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (tampering of the audit directory, the check that fails, what its violation says)
    "client-out-line-deleted": (lambda audit: _drop_first(audit / "client.jsonl", "out", p.PERSONALIZE),
                                "logs-agree", "received, but the client log has no 'out' line"),
    "server-out-line-deleted": (lambda audit: _drop_first(audit / "server.jsonl", "out", p.ADAPT),
                                "logs-agree", "received, but the server log has no 'out' line"),
    "content-hash-altered": (lambda audit: _alter_hash(audit / "client.jsonl"),
                             "logs-agree", "content differs from audit/client.jsonl:"),
    "line-duplicated": (lambda audit: _edit_lines(audit / "client.jsonl", lambda lines: [*lines, lines[2]]),
                        "logs-whole", "repeats audit/client.jsonl:3 (client"),
    "line-truncated": (lambda audit: _edit_lines(audit / "server.jsonl", _cut_fifth_line_in_half),
                       "logs-whole", "audit/server.jsonl:5: not a whole JSON line (truncated or corrupt"),
    "canaries-deleted": (lambda audit: (audit / "canaries.json").unlink(), "canaries", "canaries.json: missing"),
    "canary-unlisted": (lambda audit: (audit / "canaries.json").write_text("{}"),
                        "canaries", "does not list the canary planted in clients/"),
    "client-log-removed": (lambda audit: (audit / "client.jsonl").unlink(), "logs-whole", "client.jsonl: missing"),
    "server-log-removed": (lambda audit: (audit / "server.jsonl").unlink(), "logs-whole", "server.jsonl: missing"),
}


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_one_sided_tampering_fails_the_audit(
    tampering: str, honest_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tamper, check, message = TAMPERINGS[tampering]
    run_dir = _copy(honest_run, tmp_path)
    tamper(run_dir / "audit")
    assert audit_main([str(run_dir)]) == 1
    summary = _summary(run_dir)
    assert any(message in v for v in summary["checks"][check]["violations"]), summary["checks"][check]
    out = capsys.readouterr().out
    assert f"[FAIL] {check}" in out and message in out and "audit FAILED" in out


def test_clear_updates_fail_the_audit_of_a_secure_aggregation_run(honest_run: Path, tmp_path: Path) -> None:
    """The honest run in clear, declared a secure-aggregation run: each training user's update reached the server."""
    run_dir = _copy(honest_run, tmp_path)
    settings = json.loads((run_dir / "run.json").read_text())
    settings["config"]["secure-aggregation"] = True
    (run_dir / "run.json").write_text(json.dumps(settings))
    assert audit_main([str(run_dir)]) == 1
    violations = _summary(run_dir)["checks"]["updates-masked"]["violations"]
    assert len(violations) == 4  # 2 training users' replies, in both logs
    assert all(f"{p.ADAPT} message" in v and "update in clear in a secure-aggregation run" in v for v in violations)


def test_honest_resumed_run_passes_the_audit(resumed_run: Path, tmp_path: Path) -> None:
    run_dir = _copy(resumed_run, tmp_path)
    assert audit_main([str(run_dir)]) == 0
    summary = _summary(run_dir)
    assert len(summary["attempts"]) == 2
    # the reply the kill cut off, and any request not yet received then: counted from the cut logs themselves
    cut = _first(run_dir / "audit" / "client.jsonl", "out", p.PERSONALIZE)["time"]
    logs = {side: [e for e in _entries(run_dir / "audit" / f"{side}.jsonl") if e["time"] <= cut]
            for side in ("server", "client")}
    other = {"server": "client", "client": "server"}  # a reply carries its request's message id
    sent = {(side, e["message_id"]) for side in logs for e in logs[side] if e["direction"] == "out"}
    received = {(other[side], e["message_id"]) for side in logs for e in logs[side] if e["direction"] == "in"}
    assert summary["sent_not_received_in_interrupted_attempts"] == len(sent - received) >= 1


def _drop_killed_request(audit: Path) -> None:
    """Delete the server's line of the request whose reply the kill cut off (the client logged receiving it)."""
    _drop_line(audit / "server.jsonl", "out", _first(audit / "client.jsonl", "out", p.PERSONALIZE)["message_id"])


def _drop_resumed_reply(audit: Path) -> None:
    """Delete the client's line of the resumed attempt's last personalize reply."""
    client = audit / "client.jsonl"
    replies = [e for e in _entries(client) if (e["direction"], e["message_type"]) == ("out", p.PERSONALIZE)]
    _drop_line(client, "out", replies[-1]["message_id"])


@pytest.mark.parametrize(("tamper", "message"), [
    (_drop_killed_request, "received, but the server log has no 'out' line"),
    (_drop_resumed_reply, "received, but the client log has no 'out' line"),
], ids=["killed-attempt", "resumed-attempt"])
def test_tampered_resumed_run_fails_the_audit(
    tamper: Callable[[Path], None], message: str, resumed_run: Path, tmp_path: Path
) -> None:
    run_dir = _copy(resumed_run, tmp_path)
    tamper(run_dir / "audit")
    assert audit_main([str(run_dir)]) == 1
    assert any(message in v for v in _summary(run_dir)["checks"]["logs-agree"]["violations"])


def test_a_test_users_node_that_trains_fails_the_audit(honest_run: Path, tmp_path: Path) -> None:
    """The honest run with its training users' nodes announced as test users, in both logs: their adapt replies
    are what a test user's node may never send (test users send metric statistics only)."""
    run_dir = _copy(honest_run, tmp_path)
    for side in ("client", "server"):
        path = run_dir / "audit" / f"{side}.jsonl"
        path.write_text(path.read_text().replace(f'"{p.ROLE}": "train"', f'"{p.ROLE}": "test"'))
    assert audit_main([str(run_dir)]) == 1
    violations = _summary(run_dir)["checks"]["test-users-send-metrics-only"]["violations"]
    assert len(violations) == 4  # 2 training users' replies, in both logs
    assert all(f"{p.ADAPT} message" in v and "a test user's node replies in phase adapt" in v for v in violations)


def test_a_directory_that_is_no_run_is_refused_and_left_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It was audited (every check on empty logs) and got an audit/summary.json written into it."""
    (tmp_path / "notes.txt").write_text("not a run")
    assert audit_main([str(tmp_path)]) == 2
    assert "neither run.json nor audit/ there; expected a run directory" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]
