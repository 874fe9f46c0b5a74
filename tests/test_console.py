"""A console a person reads: a real 4-user flower-simulation prints our lines and the table; every library's lines
go to <run-dir>/logs/console.log, and reach the console only with --verbose, each once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_traces import is_loopback, listening_addresses, logged_addresses, session_logs

ARGS = ["--num-clients", "4", "--train-clients", "2", "--rounds", "1", "--task", "LaMP-2M", "--data", "synthetic",
        "--model", "tiny-random", "--methods", "base,oppu", "--batch-tokens", "256", "--personal-epochs", "1",
        "--max-history", "8", "--task-history", "4"]
NOISE = ("DEBUG", "FutureWarning", "DeprecationWarning", "DEPRECATED", "alembic", "(raylet)", "Loading weights")


# run directory, console lines, stdout, the driver's pid, the addresses its processes listened on
Quiet = tuple[Path, list[str], list[str], int, set[tuple[str, str]]]


def _run(run_dir: Path, *extra: str) -> tuple[list[str], list[str], int, set[tuple[str, str]]]:
    listening, deadline = set(), time.monotonic() + 600
    with subprocess.Popen([sys.executable, "-m", "simulation.cli", *ARGS, "--run-dir", str(run_dir), *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as driver:
        while True:
            try:
                stdout, stderr = driver.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:  # (communicate keeps what it read so far for the next call)
                assert time.monotonic() < deadline, "the run took over 600 s"
                listening |= listening_addresses(driver.pid)
    assert driver.returncode == 0, stderr[-3000:]
    console = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    # a progress bar redraws itself: keep our lines and one line per bar
    lines = [line for line in console if "%|" not in line]
    return lines, stdout.splitlines(), driver.pid, listening


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> Quiet:
    run_dir = tmp_path_factory.mktemp("console") / "run"
    return run_dir, *_run(run_dir)


def test_the_console_shows_one_line_per_phase_and_the_table(quiet: Quiet) -> None:
    run_dir, lines, stdout, _, _ = quiet
    assert [line.split(" ", 1)[1].split(":")[0] for line in lines] == [
        f"run directory {run_dir}", "6 node(s)", "task adaptation round 1"], "\n".join(lines)
    assert stdout[0] == "# OPPU-FL report: LaMP-2M (personalized movie tagging)"
    assert not [line for line in lines + stdout if any(word in line for word in NOISE)]
    assert len(set(lines)) == len(lines)


def test_the_local_ray_cluster_talks_over_loopback_only(quiet: Quiet) -> None:
    # the session this run's driver started, not Ray's latest: another test file may have started one since
    addresses = logged_addresses(session_logs(quiet[3]))
    assert addresses and all(is_loopback(ip) for ip in addresses), addresses


def test_the_local_ray_cluster_listens_on_loopback_only(quiet: Quiet) -> None:
    """Ray has no authentication: a server on every interface would let anyone who reaches the machine run code
    beside the users' stores (before: its GCS, raylet and workers listened on `::`)."""
    listening = quiet[4]
    assert {"gcs_server", "raylet"} <= {name for name, _ in listening}, listening  # Ray was seen running
    assert all(is_loopback(ip) for _, ip in listening), listening


def test_every_library_line_is_in_the_run_log(quiet: Quiet) -> None:
    log = (quiet[0] / "logs" / "console.log").read_text()
    assert "The `run_simulation` function is deprecated" in log  # Flower's warning, kept out of the console
    assert "flwr INFO [ROUND 1/1]" in log and "flwr DEBUG" in log
    assert "py.warnings WARNING" in log and "FutureWarning" in log
    assert "server.strategy INFO task adaptation round 1: 2 of 2 updates averaged" in log  # ours too


def test_verbose_shows_the_libraries_lines_once(tmp_path: Path) -> None:
    lines, _, _, _ = _run(tmp_path / "run", "--verbose")
    assert sum("[ROUND 1/1]" in line for line in lines) == 1  # Flower's handler only, not ours as well
    assert any("DEPRECATED FEATURE" in line for line in lines)
    assert sum("task adaptation round 1: 2 of 2" in line for line in lines) == 1



RAY_WARNS = """
import logging, sys
from pathlib import Path
import ray  # gives the "ray" logger its own stderr handler, as in every run
from simulation.console import run_log, setup_console
setup_console(verbose=False)
with run_log(Path(sys.argv[1])):
    logging.getLogger("ray._private.services").warning("WARNING: The object store is using /tmp/ray")
"""


def test_rays_own_warnings_go_to_the_run_log_not_the_console(tmp_path: Path) -> None:
    # Ray's logger prints to stderr through a handler of its own (e.g. "the object store is using /tmp instead of
    # /dev/shm" in a container with a small /dev/shm); it must take our route like every other library's lines
    done = subprocess.run([sys.executable, "-c", RAY_WARNS, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "object store" not in done.stderr
    log = (tmp_path / "logs" / "console.log").read_text()
    assert "ray._private.services WARNING WARNING: The object store is using /tmp/ray" in log


NATIVE = """
import logging, os, sys
from pathlib import Path
from simulation.console import run_log, setup_console
setup_console(verbose=False)
with run_log(Path(sys.argv[1])):
    os.write(2, b"[E 1 2] task_manager.cc:1224: Failed to push error to driver\\n")  # as Ray's C++ core worker does
    logging.getLogger("oppu").info("our line")
    print("a traceback's way", file=sys.stderr)
os.write(2, b"after the run\\n")
"""


def test_lines_native_code_writes_to_stderr_go_to_the_run_log(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", NATIVE, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "task_manager" not in done.stderr
    assert "our line" in done.stderr and "a traceback's way" in done.stderr and "after the run" in done.stderr
    log = (tmp_path / "logs" / "console.log").read_text()
    assert "task_manager.cc:1224: Failed to push error to driver" in log and "oppu INFO our line" in log
