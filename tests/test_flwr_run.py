"""`flwr run`, Flower's supported path (README "Running with `flwr run`"), for real: this clone's app on the local
SuperLink that `flwr run` starts (under a FLWR_HOME of the test's own), a simulation federation of a node per user.
A complete run shows the report and passes the privacy audit; a run with a test user that cannot be evaluated is
marked failed in Flower's run list (Flower's own exit status is 0 either way)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_traces import command_lines, processes_naming, still_running

from client.partition import load_users, split_users
from common.config import flwr_run_settings
from simulation.deploy.commands import CONNECTION, flwr_run_command, local_simulation_env
from simulation.engine import RAY_LOCAL_ONLY
from simulation.privacy_audit import main as audit_main

REPO = Path(__file__).resolve().parents[1]
FLWR = Path(sys.executable).parent / "flwr"
RUN_CONFIG = {"num-clients": 2, "train-clients": 2, "model": "tiny-random", "data": "synthetic", "task": "LaMP-2M",
              "rounds": 1, "methods": "base,oppu", "max-history": 8, "task-history": 4}
Flwr = dict[str, str]  # the environment `flwr` runs in


@pytest.fixture(scope="module")
def flwr_env(tmp_path_factory: pytest.TempPathFactory):
    """A FLWR_HOME whose one connection is Flower's local simulation, on ports of its own (`flwr run` would use
    any local SuperLink that answers on its default port); the SuperLink is stopped at the end (`flwr run` leaves it
    running)."""
    home = tmp_path_factory.mktemp("flwr-home")
    # (the Ray that Flower starts listens on loopback only, as README says to set)
    yield {**local_simulation_env(home), RAY_LOCAL_ONLY: "0"}
    superlinks = processes_naming(home)  # its state database lies under this home
    for process in superlinks:
        process.terminate()
    assert not still_running(superlinks, time.monotonic() + 15), command_lines(superlinks)


def _flwr(env: Flwr, command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _run(env: Flwr, run_dir: Path, **changes: object) -> str:
    """`flwr run` of RUN_CONFIG (with `changes`) into `run_dir`, as oppu-deploy runs it; its output (exit status 0, as
    Flower gives even for a failed run)."""
    cfg, counts, _ = flwr_run_settings({**RUN_CONFIG, **changes})
    done = _flwr(env, [*flwr_run_command(cfg, counts, run_dir), "--federation-config",
                       f"num-supernodes={counts.nodes(cfg)}"])
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    return done.stdout + done.stderr


def _latest_status(env: Flwr) -> dict:
    listed = _flwr(env, [str(FLWR), "ls", CONNECTION, "--format", "json"])
    runs = json.loads(listed.stdout)["runs"]
    return max(runs, key=lambda run: run["finished-at"])


@pytest.fixture(scope="module")
def finished(flwr_env: Flwr, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A complete `flwr run`: (its run directory, its output)."""
    run_dir = tmp_path_factory.mktemp("flwr-run") / "run"
    return run_dir, _run(flwr_env, run_dir)


def test_a_flwr_run_shows_its_report_and_passes_the_audit(flwr_env: Flwr, finished: tuple[Path, str]) -> None:
    run_dir, output = finished
    assert f"report: {run_dir / 'report.md'}" in output and "# OPPU-FL report: LaMP-2M" in output
    assert "task adaptation round 1: 2 of 2 updates averaged" in output  # our lines, through Flower's handler
    report = json.loads((run_dir / "report.json").read_text())
    assert report["users"] == {"test": 2, "evaluated": 2, "failed": 0, "train": 2}
    assert json.loads((run_dir / "audit" / "canaries.json").read_text()) == {}
    assert audit_main([str(run_dir)]) == 0  # before: failed, audit/canaries.json missing
    assert _latest_status(flwr_env)["status"] == "finished:completed"


def test_the_same_run_dir_goes_on_with_the_same_settings_only(flwr_env: Flwr, finished: tuple[Path, str]) -> None:
    """Before, a run with 3 training users reused the task adapter and results that 2 had made there (the task
    adapter's key holds no user counts), and reported them as its own."""
    run_dir, _ = finished
    settings = (run_dir / "run.json").read_text()
    output = _run(flwr_env, run_dir, **{"train-clients": 3})
    status = _latest_status(flwr_env)
    assert status["status"] == "finished:failed"
    assert f"Simulation failed with exception: run-dir {run_dir} holds a run made with other settings " \
           "(train-clients 2 there, 3 here); give another run-dir" in status["status-details"]
    assert (run_dir / "run.json").read_text() == settings and "reusing the task adapter" not in output
    output = _run(flwr_env, run_dir)  # the same settings: the run goes on from what it stored
    assert "reusing the task adapter" in output and _latest_status(flwr_env)["status"] == "finished:completed"
    assert json.loads((run_dir / "report.json").read_text())["users"]["evaluated"] == 2


def test_flwr_run_and_flower_simulation_give_the_same_run(flwr_env: Flwr, tmp_path: Path) -> None:
    """The same settings on both, on MovieLens (the item table summed under SecAgg+, the calibration round): each
    round samples 2 of 6 training users, and both runs train the same task adapter and write the same report (the
    server orders nodes by the ids flower-simulation draws from the seed; before, `flwr run` sampled by Flower's
    random ids: other users in each round)."""
    changes = {"data": "default", "task": "MovieLens", "train-clients": 6, "train-per-round": 2, "rounds": 2}
    _run(flwr_env, tmp_path / "flwr-run", **changes)
    flags = [arg for key, value in {**RUN_CONFIG, **changes}.items() for arg in (f"--{key}", str(value))]
    done = subprocess.run([str(FLWR.parent / "flower-simulation"), *flags, "--run-dir", str(tmp_path / "simulation")],
                          cwd=REPO, env=flwr_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    adapters, reports = [], []
    for run_dir in (tmp_path / "flwr-run", tmp_path / "simulation"):
        adapters.append((run_dir / "server" / "task_adapter" / "adapter_model.safetensors").read_bytes())
        report = json.loads((run_dir / "report.json").read_text())
        reports.append({key: report[key] for key in ("methods", "comparisons")})
        assert report["task_adaptation"]["sampled_updates"] == {"1": 2, "2": 2}
    assert adapters[0] == adapters[1]
    assert reports[0] == reports[1]


def test_a_flwr_run_with_a_failed_test_user_is_marked_failed(flwr_env: Flwr, tmp_path: Path) -> None:
    cfg, counts, _ = flwr_run_settings(RUN_CONFIG)
    test, _ = split_users(load_users(cfg, counts.users_hint()), counts, cfg)
    run_dir = tmp_path / "run"
    (run_dir / "clients").mkdir(parents=True)
    (run_dir / "clients" / test[1].user_id).write_text("")  # a file where its store should be: its node fails
    output = _run(flwr_env, run_dir)
    assert "1 of 2 test users evaluated, 1 failed" in output  # the report still written and shown
    status = _latest_status(flwr_env)
    assert status["status"] == "finished:failed"
    assert status["status-details"].startswith("Simulation failed with exception: the run is not complete: 1 test "
                                               "user(s) failed, 1 of 2 evaluated:")


def _imports_flwr_app(first: str) -> dict:
    """In a fresh interpreter: import `first` (or nothing), then the app module `flwr run` loads; what it found."""
    code = (f"import sys, json\n{first}\nimport simulation.flwr_app as a\n"
            "vce = sys.modules.get(a.ENGINE_MODULE)\n"
            "print(json.dumps({'engine': vce is not None, 'patient': vce is not None and "
            "vce.add_messages_to_queue.__name__ == 'patient_extractor', 'apps': [type(a.server_app).__name__, "
            "type(a.client_app).__name__], 'torch': 'torch' in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_the_apps_put_the_patient_loop_in_flowers_engine_only_where_it_runs() -> None:
    """Flower's simulation runtime has its engine loaded before it imports the apps; a SuperNode has none, and
    loads the module for every message: without torch (the ServerApp's code imports it when the ServerApp runs)."""
    in_runtime = _imports_flwr_app("import flwr.simulation.app")
    del in_runtime["torch"]  # (whatever Flower's runtime imports itself)
    assert in_runtime == {"engine": True, "patient": True, "apps": ["ServerApp", "ClientApp"]}
    elsewhere = _imports_flwr_app("import flwr.supernode.runtime.run_clientapp")
    assert elsewhere == {"engine": False, "patient": False, "apps": ["ServerApp", "ClientApp"], "torch": False}
