"""The federated flow on Flower's real simulation engine (Ray), with the tiny model and synthetic users."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.config import RunConfig
from common.metrics import finalize, statistics
from common.tasks import get_task
from server.view import read_server_view
from simulation.cli import main
from simulation.engine import SimulationOptions, simulate
from simulation.flags import build_parser, user_counts
from simulation.run_dir import RUN_LOCK

REPO = Path(__file__).resolve().parents[1]

TINY_ARGS = [
    "--task", "LaMP-2M", "--data", "synthetic", "--model", "tiny-random", "--personal-lr", "1e-2",
    "--personal-epochs", "4", "--batch-tokens", "256", "--max-history", "0", "--task-history", "8",
]


def _config(argv: list[str]) -> tuple:
    args = build_parser().parse_args(argv)
    fields = {f for f in RunConfig.__dataclass_fields__}
    return args, RunConfig(**{k: v for k, v in vars(args).items() if k in fields})


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One run: 3 test users, 3 training users, 2 FedAvg rounds, methods base/oppu/rag."""
    run_dir = tmp_path_factory.mktemp("flow") / "run"
    args, cfg = _config(
        ["--num-clients", "3", "--train-clients", "3", "--rounds", "2", "--methods", "base,oppu,oppu+rag",
         "--run-dir", str(run_dir), "--record-server-view", *TINY_ARGS]
    )
    return simulate(cfg, user_counts(args), SimulationOptions.from_args(args))


def test_task_adapter_is_the_weighted_mean_of_client_updates(federated_run: tuple[Path, dict]) -> None:
    run_dir, report = federated_run
    view = read_server_view(run_dir)
    assert sorted(view) == [1, 2]
    assert all(len(held.updates) == 3 for held in view.values())
    saved = load_file(str(run_dir / "server" / "task_adapter" / "adapter_model.safetensors"))
    initial = view[1].sent
    updates = view[2].updates.values()
    total = sum(n for n, _ in updates)
    assert total > 0
    for name, value in saved.items():
        expected = sum(n * arrays[name] for n, arrays in updates) / total
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7)
    changed = [name for name in saved if not np.array_equal(saved[name], initial[name])]
    assert changed, "the aggregated task adapter did not move from its initialisation"
    assert set(report["task_adaptation"]["train_loss"]) == {"1", "2"}


def test_a_server_learning_rate_and_momentum_step_on_the_averaged_updates(tmp_path: Path) -> None:
    args, cfg = _config(["--num-clients", "1", "--train-clients", "2", "--rounds", "2", "--methods", "base",
                         "--server-lr", "2", "--server-momentum", "0.5", "--run-dir", str(tmp_path / "run"),
                         "--record-server-view", *TINY_ARGS])
    run_dir, _ = simulate(cfg, user_counts(args), SimulationOptions.from_args(args))
    view = read_server_view(run_dir)
    saved = load_file(str(run_dir / "server" / "task_adapter" / "adapter_model.safetensors"))
    def average(server_round: int, name: str) -> np.ndarray:
        updates = view[server_round].updates.values()
        return sum(n * arrays[name] for n, arrays in updates) / sum(n for n, _ in updates)

    plain = []
    for name in saved:  # FedAvgM: step = lr * (momentum * previous step + (global - average))
        start, second = view[1].sent[name], view[2].sent[name]
        first_step = start - average(1, name)
        np.testing.assert_allclose(second, start - 2 * first_step, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(saved[name], second - 2 * (0.5 * first_step + second - average(2, name)),
                                   rtol=1e-5, atol=1e-6)
        plain.append(np.allclose(second, average(1, name)))
    assert not all(plain)  # not plain FedAvg


def test_the_server_reads_each_reply_as_soon_as_its_node_sends_it(federated_run: tuple[Path, dict]) -> None:
    """The simulation's server waits for replies on the engine's store event (simulation/waiting.py): by the audit
    logs' clocks each reply is read well within a second of leaving its node (pulls backing off: up to 2 s)."""
    run_dir, _ = federated_run
    def times(side: str, direction: str) -> dict[str, float]:
        lines = (run_dir / "audit" / f"{side}.jsonl").read_text().splitlines()
        return {e["message_id"]: e["time"] for e in map(json.loads, lines) if e["direction"] == direction}

    sent, read = times("client", "out"), times("server", "in")
    late = sorted(read[m] - sent[m] for m in read)
    assert len(late) == len(sent) >= 15  # every phase: announce, model, 2 rounds, calibration, personalization
    assert late[-1] < 0.5, late[-5:]


def test_combined_metrics_equal_central_metrics(federated_run: tuple[Path, dict]) -> None:
    run_dir, report = federated_run
    task = get_task("LaMP-2M")
    assert report == json.loads((run_dir / "report.json").read_text())
    nodes = json.loads((run_dir / "nodes.json").read_text())
    test_users = [n["user"] for n in nodes if n["role"] == "test"]
    assert report["users"] == {"test": 3, "evaluated": 3, "failed": 0, "train": 3}
    for method in ("base", "oppu", "oppu+rag-k1"):
        predictions, golds = [], []
        for user in test_users:
            kept = json.loads((run_dir / "clients" / user / "predictions.json").read_text())[method]
            predictions += [k["prediction"] for k in kept]
            golds += [k["gold"] for k in kept]
        central = finalize(task, statistics(task, predictions, golds))
        assert report["methods"][method]["metrics"] == pytest.approx(central, abs=1e-12)
        assert report["methods"][method]["queries"] == len(golds)
    # planted preferences: personal adapters must beat the shared model
    assert report["methods"]["oppu"]["metrics"]["accuracy"] > report["methods"]["base"]["metrics"]["accuracy"]
    assert (run_dir / "report.md").read_text().count("| accuracy") == 1
    assert (run_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_personal_adapters_exist_only_in_client_stores(federated_run: tuple[Path, dict]) -> None:
    run_dir, _ = federated_run
    nodes = json.loads((run_dir / "nodes.json").read_text())
    adapter_files = sorted(p.relative_to(run_dir) for p in run_dir.rglob("adapter_model.safetensors"))
    expected = sorted(
        Path("clients") / n["user"] / "adapters" / f"user-{n['user']}-{variant}" / "adapter_model.safetensors"
        for n in nodes if n["role"] == "test" for variant in ("k0", "k1")
    ) + [Path("server/task_adapter/adapter_model.safetensors")]
    assert adapter_files == sorted(expected)
    for n in nodes:
        if n["role"] == "train":
            assert not (run_dir / "clients" / n["user"] / "adapters").exists()


def test_each_adapter_records_its_training_work_and_the_benchmark_reads_it(federated_run: tuple[Path, dict], tiny) -> None:
    """The tokens a node records beside each adapter are its examples' tokens times the epochs (4 whole epochs),
    summed per variant by bench.end_to_end, which turns them into in-run MFU."""
    from bench.end_to_end import in_run_mfu, recorded_training, user_phase_seconds
    from client.data import load_oppu
    from client.training import history_examples
    from common.store import UserStore

    run_dir, _ = federated_run
    config = json.loads((run_dir / "report.json").read_text())["config"]
    cfg = RunConfig.from_record(config)
    task, (_, tokenizer) = get_task(cfg.task), tiny
    tests = [n["user"] for n in json.loads((run_dir / "nodes.json").read_text()) if n["role"] == "test"]
    expected = {}
    for variant, k in (("k0", 0), ("k1", 1)):
        examples = [e for user in tests for e in history_examples(
            load_oppu(UserStore(run_dir, user).data, task.name)[0], task, tokenizer, cfg.prompt_settings(k),
            None, cfg.max_history or None)]
        expected[variant] = (4 * sum(len(e.prompt) + len(e.answer) for e in examples), 4 * sum(len(e.answer) for e in examples))
    work = recorded_training(run_dir)
    assert {v: (row["tokens"], row["answer_tokens"]) for v, row in work.items()} == expected
    assert all(row["adapters"] == len(tests) and row["seconds"] > 0 for row in work.values())
    phases = user_phase_seconds(run_dir)
    assert set(phases) == {"train-k0", "train-k1", "evaluate"}
    assert phases["train-k0"] == pytest.approx(work["k0"]["seconds"] / len(tests))
    mfu = in_run_mfu(run_dir, config)
    assert set(mfu["variants"]) == {"k0", "k1"} and mfu["peak_gflops"] > 0
    assert all(0 < row["in_run_mfu"] < 1 and 0 < row["alone_mfu"] < 1 for row in mfu["variants"].values())


def test_failing_client_exits_nonzero_and_resume_skips_finished_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    argv = ["--num-clients", "3", "--rounds", "0", "--methods", "base,oppu", "--run-dir", str(run_dir), *TINY_ARGS]
    assert main(argv) == 0
    nodes = json.loads((run_dir / "nodes.json").read_text())
    finished, broken, damaged = (node["user"] for node in nodes)
    adapter = run_dir / "clients" / finished / "adapters" / f"user-{finished}-k0" / "adapter_model.safetensors"
    redone = run_dir / "clients" / damaged / "adapters" / f"user-{damaged}-k0" / "adapter_model.safetensors"
    mtime, damaged_mtime = adapter.stat().st_mtime_ns, redone.stat().st_mtime_ns
    statistics = json.loads((run_dir / "clients" / damaged / "result.json").read_text())["statistics"]
    # the second user's device loses its result and its data is damaged: its client raises on resume
    (run_dir / "clients" / broken / "result.json").unlink()
    (run_dir / "clients" / broken / "data.json").write_text("{not json")
    # the third user's stored result is cut short: it is recomputed, not trusted and not a failure
    (run_dir / "clients" / damaged / "result.json").write_text('{"key": "')
    assert main([*argv, "--resume"]) == 1
    report = json.loads((run_dir / "report.json").read_text())
    assert report["users"]["failed"] == 1 and report["users"]["evaluated"] == 2
    assert adapter.stat().st_mtime_ns == mtime, "resume retrained a user whose result was stored"
    assert redone.stat().st_mtime_ns != damaged_mtime, "a damaged result was not recomputed"
    assert json.loads((run_dir / "clients" / damaged / "result.json").read_text())["statistics"] == statistics
    assert main(argv) == 2  # no silent overwrite without --resume
    assert "already holds a run; pass --resume or another --run-dir" in capsys.readouterr().err


def test_cli_rejects_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [(["--methods", "oppu+magic"], "unknown part 'magic'"),
                          (["--task", "LaMP-9"], "unknown task 'LaMP-9'")]:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_differential_privacy_reports_epsilon(tmp_path: Path) -> None:
    run_dir = tmp_path / "dp"
    argv = ["--num-clients", "1", "--train-clients", "2", "--rounds", "2", "--methods", "base",
            "--dp-noise", "1.0", "--dp-clip", "0.5", "--run-dir", str(run_dir), *TINY_ARGS]
    assert main(argv) == 0
    report = json.loads((run_dir / "report.json").read_text())
    dp = report["task_adaptation"]["differential_privacy"]
    assert dp["releases"] == 2 and dp["noise_multiplier"] == 1.0 and dp["delta"] == 1e-5
    assert 0 < dp["epsilon"] < float("inf")
    assert "client-level DP" in (run_dir / "report.md").read_text()
    # a resumed run reuses the released adapter and reports the same privacy spent
    (run_dir / "report.json").unlink()
    assert main([*argv, "--resume"]) == 0
    assert json.loads((run_dir / "report.json").read_text())["task_adaptation"]["differential_privacy"] == dp


def _noise_std(run_dir: Path, server_round: int = 1) -> list[float]:
    """Per update the server holds for the round: the standard deviation of (update - global) over its weights."""
    held = read_server_view(run_dir)[server_round]
    return [float(np.std(np.concatenate([(arrays[n] - held.sent[n]).ravel() for n in held.sent])))
            for _, arrays in held.updates.values()]


def test_client_side_dp_noises_each_update_on_the_device(tmp_path: Path) -> None:
    args, cfg = _config(["--num-clients", "1", "--train-clients", "2", "--rounds", "1", "--methods", "base",
                         "--local-dp-epsilon", "2.0", "--dp-clip", "0.5", "--run-dir", str(tmp_path / "ldp"),
                         "--record-server-view", *TINY_ARGS])
    run_dir, report = simulate(cfg, user_counts(args), SimulationOptions.from_args(args))
    dp = report["task_adaptation"]["differential_privacy"]
    assert (dp["mode"], dp["epsilon"], dp["delta"], dp["releases"]) == ("client-side", 2.0, 1e-5, 1)
    # LocalDpMod's Gaussian mechanism: std = sensitivity (2 * clip) * sqrt(2 ln(1.25 / delta)) / epsilon
    expected = 2 * 0.5 * np.sqrt(2 * np.log(1.25 / 1e-5)) / 2.0
    assert _noise_std(run_dir) == pytest.approx([expected] * 2, rel=0.05)  # the clipped update is ~0.5 / 60 each
    assert report["task_adaptation"]["train_loss"] == {}  # the loss stays on the device
    assert "client-side DP (Flower's LocalDpMod" in (run_dir / "report.md").read_text()


def test_distributed_dp_adds_each_clients_share_of_the_noise_under_secure_aggregation(tmp_path: Path) -> None:
    args, cfg = _config(["--num-clients", "1", "--train-clients", "2", "--rounds", "1", "--methods", "base",
                         "--secure-aggregation", "--dp-noise", "1.0", "--dp-clip", "0.5",
                         "--run-dir", str(tmp_path / "ddp"), "--record-server-view", *TINY_ARGS])
    run_dir, report = simulate(cfg, user_counts(args), SimulationOptions.from_args(args))
    dp = report["task_adaptation"]["differential_privacy"]
    assert (dp["mode"], dp["noise_multiplier"], dp["releases"]) == ("distributed", 1.0, 1)
    assert 0 < dp["epsilon"] < float("inf")
    # two clients add std 1.0 * 0.5 / sqrt(2) each: the sum has std 0.5, the average 0.25
    assert _noise_std(run_dir) == pytest.approx([0.25] * 2, rel=0.05)
    assert "distributed: each device adds its share of the noise" in (run_dir / "report.md").read_text()


def test_reference_rows_and_best_constant_on_values(federated_run: tuple[Path, dict]) -> None:
    """The user's most frequent label and the training users' most frequent answer, recomputed from the stores."""
    from collections import Counter

    from client.data import load_oppu

    run_dir, report = federated_run
    task = get_task("LaMP-2M")
    nodes = json.loads((run_dir / "nodes.json").read_text())
    users = {n["role"]: [] for n in nodes}
    for n in nodes:
        users[n["role"]] += load_oppu(run_dir / "clients" / n["user"] / "data.json", "LaMP-2M")
    train_answers = Counter()
    for user in users["train"]:  # each training user's shares, weighted by its task-adaptation examples
        answers = [h.fields["tag"] for h in user.history] + [q.gold for q in user.queries]
        weight = len(user.queries) + min(8, len(user.history))
        train_answers.update({a: weight * c / len(answers) for a, c in Counter(answers).items()})
    assert report["constant_answer"] == max(task.labels, key=lambda t: (train_answers[t], -task.labels.index(t)))
    assert report["decision_rule"] == "argmax"
    predictions, golds = {"ref-mode": [], "ref-constant": []}, []
    for user in users["test"]:
        answers = [h.fields["tag"] for h in user.history]
        mode = max(set(answers), key=lambda a: (answers.count(a), max(i for i, b in enumerate(answers) if b == a)))
        predictions["ref-mode"] += [mode] * len(user.queries)
        predictions["ref-constant"] += [report["constant_answer"]] * len(user.queries)
        golds += [q.gold for q in user.queries]
    assert set(report["references"]) == {"ref-mode", "ref-constant"}  # (report.json keeps its keys sorted)
    for name, predicted in predictions.items():
        central = finalize(task, statistics(task, predicted, golds))
        assert report["references"][name]["metrics"] == pytest.approx(central, abs=1e-12)
    compared = {(c["method"], c["reference"]) for c in report["comparisons"]}
    assert {("oppu", "base"), ("oppu", "ref-mode"), ("base", "ref-constant")} <= compared
    markdown = (run_dir / "report.md").read_text()
    assert "| ref-mode | ref-constant |" in markdown and "decision rule `argmax`" in markdown


def test_task_adapter_from_reuses_an_earlier_runs_adapter_and_refuses_other_settings(
    federated_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Personal settings may differ from the source run; a task-adaptation setting may not."""
    source, _ = federated_run
    base = ["--num-clients", "3", "--train-clients", "3", "--rounds", "2", "--methods", "base,oppu,oppu+rag",
            *TINY_ARGS, "--task-adapter-from", str(source)]
    reused = tmp_path / "reused"
    assert main([*base, "--run-dir", str(reused), "--personal-lr", "5e-3"]) == 0
    name = "adapter_model.safetensors"
    assert (reused / "server" / "task_adapter" / name).read_bytes() == \
        (source / "server" / "task_adapter" / name).read_bytes()
    report = json.loads((reused / "report.json").read_text())
    assert report["task_adaptation"]["copied_from"] == str(source.resolve())
    assert report["task_adaptation"]["train_loss"] == json.loads((source / "report.json").read_text())[
        "task_adaptation"]["train_loss"]
    assert f"reused from the run in {source.resolve()}" in (reused / "report.md").read_text()
    capsys.readouterr()
    for changed, key in ((["--task-lr", "1e-3"], "task-lr"), (["--methods", "base,oppu+rag-k2"], "retrieval-depths")):
        refused = tmp_path / key
        assert main([*base, "--run-dir", str(refused), *changed]) == 2
        err = capsys.readouterr().err
        assert "made under other task-adaptation settings: " + key in err and " there, " in err, err
        assert not (refused / "server" / "task_adapter").exists() and not (refused / "run.json").exists()


def test_a_run_directory_is_held_by_one_run_at_a_time(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "simulation.cli", "--num-clients", "2", "--rounds", "0", "--methods", "base,oppu",
            "--run-dir", str(run_dir), *TINY_ARGS]
    first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = run_dir / RUN_LOCK
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
        time.sleep(0.1)
    second = subprocess.run([*argv, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
    assert second.returncode == 2
    assert second.stderr == (f"flower-simulation: --run-dir {run_dir}: in use by another run (pid {first.pid}); "
                             "wait for it to end, or pick another --run-dir\n")
    assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    # the finished run's lock file is left with its pid, but nobody holds it: a resume goes ahead
    assert lock.read_text() == f"{first.pid}\n"
    assert main([*argv[3:], "--resume"]) == 0
