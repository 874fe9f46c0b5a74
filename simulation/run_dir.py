"""The run directory's life: a new one or (--resume) an earlier one whose settings match, held by one process at a
time, and a task adapter copied in from another run (--task-adapter-from)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from common.config import RunConfig, UserCounts, run_settings, settings_differences
from common.store import JsonFileError, atomic_directory, atomic_write_json, load_json_file, read_json
from simulation.errors import SetupError

RUNS_DIR = Path("runs")
RUN_LOCK = "run.lock"  # in the run directory, held by the process that runs it


def _latest_run() -> Path | None:
    runs = sorted(p for p in RUNS_DIR.glob("*") if (p / "run.json").exists()) if RUNS_DIR.is_dir() else []
    return runs[-1] if runs else None


def prepare_run_dir(cfg: RunConfig, counts: UserCounts, run_dir: Path | None, resume: bool) -> Path:
    """The run directory: new, or (with --resume) an earlier one whose settings match; a SetupError otherwise."""
    settings = run_settings(cfg, counts)
    if resume:
        found = run_dir or _latest_run()
        if found is None or not (found / "run.json").exists():
            raise SetupError(f"--resume: no earlier run found in {run_dir or RUNS_DIR}")
        run_dir = found
        if differ := settings_differences(read_run_state(run_dir / "run.json"), settings):
            raise SetupError(f"--resume: {run_dir} was run with other settings ({run_dir / 'run.json'}): {differ}")
        return run_dir
    run_dir = run_dir or RUNS_DIR / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.task}"
    if (run_dir / "run.json").exists():
        raise SetupError(f"--run-dir {run_dir}: already holds a run; pass --resume or another --run-dir")
    return run_dir


def read_run_state(path: Path) -> Any:
    """A file of the run directory that --resume needs as it is (run.json, nodes.json); damaged: a SetupError."""
    try:
        return load_json_file(path)
    except JsonFileError as e:
        raise SetupError(f"{e}; the run there cannot be resumed: start it again in another directory") from e


@contextlib.contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this process while it runs: a second run on it is refused with the holder's pid. The
    lock (flock on run.lock) ends with the process, so a killed run leaves none that blocks its --resume. A run
    directory made here and left with nothing but the lock (the run was refused before it wrote anything) goes."""
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(run_dir / RUN_LOCK, "a+") as lock:
            _lock_for_this_process(lock, run_dir)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        if made and [p.name for p in run_dir.iterdir()] == [RUN_LOCK]:
            shutil.rmtree(run_dir)


def _lock_for_this_process(lock: Any, run_dir: Path) -> None:
    """Take the run directory's lock and write this process's pid into it; a SetupError naming the holder's pid."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        raise SetupError(f"--run-dir {run_dir}: in use by another run (pid {holder}); wait for it to end, "
                         "or pick another --run-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()


def copy_task_adapter(source: Path, run_dir: Path, cfg: RunConfig, counts: UserCounts, canaries: bool) -> None:
    """Copy `source`'s task adapter into `run_dir/server/`, where the server reuses it; a SetupError (nothing
    written) unless `source` made it under this run's task-adaptation settings, users and no canaries."""
    flag = f"--task-adapter-from {source}"
    try:
        earlier, saved = read_json(source / "run.json"), read_json(source / "server" / "task_adapter.json")
        planted = read_json(source / "audit" / "canaries.json")
    except JsonFileError as e:
        raise SetupError(f"{flag}: {e}") from e
    if earlier is None or saved is None:
        raise SetupError(f"{flag}: expected a run directory whose task adaptation finished "
                         "(run.json and server/task_adapter.json)")
    theirs = {**earlier, "config": RunConfig.from_record(earlier["config"]).task_adaptation_settings()}
    differ = [settings_differences(theirs, {**run_settings(cfg, counts), "config": cfg.task_adaptation_settings()})]
    if canaries or planted:
        differ.append("canaries (planted strings are drawn per run)")
    if differ := [d for d in differ if d]:
        raise SetupError(f"{flag}: its task adapter was made under other task-adaptation settings: "
                         + "; ".join(differ))
    target = run_dir / "server" / "task_adapter"
    with atomic_directory(target, replace=True) as staging:
        shutil.copytree(source / "server" / "task_adapter", staging, dirs_exist_ok=True)
    atomic_write_json(target.parent / "task_adapter.json", {**saved, "copied_from": str(source.resolve())})
