"""How a command ends (common/exit_status.py): bad input (one line saying what to fix), a run that did not
complete (saying why), Ctrl-C, done."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import NoReturn

import psutil

from common.config import UserCounts
from common.exit_status import BAD_INPUT, DONE, FAILED, INTERRUPTED
from server.report import missing_updates, unevaluated_test_users
from simulation.deploy.processes import stop_trees
from simulation.errors import EngineStopped, SetupError


def stop_now(prog: str, to_continue: str) -> NoReturn:
    """Ctrl-C: 130 (128 + SIGINT, as shells report it), at once (_end_process); every finished user's result is
    already on disk (atomic writes), and `to_continue` (the command's way to resume) goes on from there."""
    print(f"{prog}: interrupted; finished users are kept: {to_continue}", file=sys.stderr, flush=True)
    _end_process(INTERRUPTED)


def engine_stopped(prog: str, to_continue: str, error: EngineStopped) -> NoReturn:
    """Flower's engine raised under the run: 1 at once (_end_process), with one line saying why; finished users'
    results are kept, to go on from once the cause is fixed."""
    print(f"{prog}: {error}; finished users are kept: fix the cause, then {to_continue}", file=sys.stderr,
          flush=True)
    _end_process(FAILED)


def _end_process(status: int) -> NoReturn:
    """Flower's engine has stopped its workers, but its ServerApp thread would wait out the reply timeout for answers
    that will not come, and Python waits for that thread before it exits. So the process ends now, and with it the
    local Ray cluster it started (GCS, raylet, agents, workers), killed at once: `ray.shutdown()` raced Flower's
    threads, which still call into Ray, and Ray's core worker then ended this process with status 1 halfway through
    it, leaving Ray's dashboard and runtime-env agents running (seen once under a loaded suite). A cluster joined
    with --ray-address is not this process's to kill: it is left with `ray.shutdown()`."""
    import ray  # only here, by which time the engine has loaded it

    started = psutil.Process().children()
    if started:
        stop_trees(started, grace=0)
    elif ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    os._exit(status)


def setup_failure(prog: str, error: SetupError, verbose: bool) -> int:
    """Exit status 2 with one line saying what to fix; the traceback only with --verbose."""
    if verbose:
        traceback.print_exception(error)
    print(f"{prog}: {error}", file=sys.stderr)
    return BAD_INPUT


def run_failures(report: dict, counts: UserCounts, allow_failed_updates: bool) -> list[str]:
    """Why a finished run is not a complete one: test users not evaluated, and (without --allow-failed-updates)
    training users' updates missing from the task adapter."""
    failures = [why] if (why := unevaluated_test_users(report, counts.test)) else []
    if (missing := missing_updates(report)) and not allow_failed_updates:
        failures.append(f"{missing} (see the log above); pass --allow-failed-updates to accept it, or run again in "
                        "a new --run-dir (--resume keeps this task adapter)")
    return failures


def exit_status(prog: str, report: dict, counts: UserCounts, allow_failed_updates: bool) -> int:
    """1 if the run is not complete (saying why on stderr), else 0."""
    failures = run_failures(report, counts, allow_failed_updates)
    for failure in failures:
        print(f"{prog}: {failure}", file=sys.stderr)
    return FAILED if failures else DONE
