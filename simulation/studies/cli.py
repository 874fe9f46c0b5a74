"""`oppu-study`: the paper's studies, each a subcommand that runs its arms as ordinary federated runs.

Every arm is a `flower-simulation` run in `<study-dir>/<arm>/`; an arm whose report is complete is reused
and an interrupted one is resumed, so rerunning the same command continues a study. Then the study's
table (markdown + json) and plot are written into the study directory (simulation/studies/arms.py, report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from common.config import run_settings, settings_differences
from common.exit_status import DONE, FAILED
from common.store import read_saved_state
from simulation.engine import SimulationOptions, simulate
from simulation.errors import EngineStopped, SetupError
from simulation.flags import DefaultsHelpFormatter, add_run_flags, check_run_flags, run_config_of, user_counts
from simulation.outcome import engine_stopped, run_failures, setup_failure, stop_now
from simulation.run_dir import RUNS_DIR, read_run_state
from simulation.console import setup_console
from simulation.studies.arms import STUDIES, Arm

STUDY_CLIENTS = {"num_clients": 20, "train_clients": 10}  # the main run's 100 + 20 users take an hour on 2 cores


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per study, each with flower-simulation's flags except those its arms set."""
    parser = argparse.ArgumentParser(
        prog="oppu-study",
        description="The OPPU paper's studies as federated runs; each writes <study>.md, .json and .png "
        "(bootstrap CIs over users for every difference) into its study directory.",
    )
    subcommands = parser.add_subparsers(dest="study", required=True, metavar="STUDY")
    for study in STUDIES.values():
        sub = subcommands.add_parser(study.name, help=study.help, description=study.help,
                                     formatter_class=DefaultsHelpFormatter)
        add_run_flags(sub, one_run=False, fixed=study.fixed)
        sub.add_argument("--study-dir", type=Path, default=None,
                         help="where the arms' runs and the study's files go (default: runs/<time>-study-<name>)")
        if study.flags:
            study.flags(sub)
        sub.set_defaults(**STUDY_CLIENTS, **study.defaults)
    return parser


def _complete(report: dict[str, Any] | None, args: argparse.Namespace) -> bool:
    return bool(report) and not run_failures(report, user_counts(args), args.allow_failed_updates)


def run_arm(args: argparse.Namespace, arm: Arm, run_dir: Path) -> dict[str, Any] | None:
    """The arm's report: reused when complete, else the run is made (or resumed); None if it did not finish."""
    counts = user_counts(args)
    options = dataclasses.replace(SimulationOptions.from_args(args), run_dir=run_dir, resume=False)
    earlier = read_run_state(run_dir / "run.json") if (run_dir / "run.json").exists() else None
    if earlier is not None:
        if differ := settings_differences(earlier, run_settings(arm.config, counts)):
            raise SetupError(f"--study-dir: {run_dir} was run with other settings ({differ}); pass another "
                             "--study-dir")
        report = read_saved_state(run_dir / "report.json")
        if _complete(report, args):
            print(f"  reusing the finished run in {run_dir}", flush=True)
            return report
        options = dataclasses.replace(options, resume=True)
        print("  resuming the unfinished run", flush=True)
    check_run_flags(args, arm.config, run_dir)
    return simulate(arm.config, counts, options)[1]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_console(args.verbose)
    cfg = run_config_of(args, parser)
    study = STUDIES[args.study]
    study_dir = (args.study_dir or RUNS_DIR / f"{datetime.now():%Y%m%d-%H%M%S}-study-{study.name}").resolve()
    start = time.perf_counter()
    try:
        arms = study.arms(cfg, args)
    except SetupError as e:
        return setup_failure("oppu-study", e, args.verbose)
    runs, failed = {}, []
    for i, arm in enumerate(arms, 1):
        run_dir = study_dir / arm.name
        print(f"[{i}/{len(arms)}] {study.name}: arm {arm.name!r} -> {run_dir}", flush=True)
        try:
            report = run_arm(args, arm, run_dir)
        except SetupError as e:
            return setup_failure("oppu-study", e, args.verbose)
        except EngineStopped as e:
            engine_stopped("oppu-study", f"run the same command again with --study-dir {study_dir}", e)
        except KeyboardInterrupt:
            stop_now("oppu-study", f"run the same command again with --study-dir {study_dir}")
        if _complete(report, args):
            runs[arm.name] = run_dir
        else:
            failed.append(arm.name)
    if failed:
        print(f"oppu-study: arm(s) {', '.join(failed)} did not finish with every test user evaluated and every "
              f"training-user update averaged; see the log above and their report.md; rerun the same command to "
              f"resume them, with --allow-failed-updates to accept failed updates ({study_dir})", file=sys.stderr)
        return FAILED
    markdown = study.finish(cfg, runs, args, study_dir)
    print(markdown.read_text())
    print(f"wall time {time.perf_counter() - start:.0f} s; study: {markdown}")
    return DONE


if __name__ == "__main__":
    sys.exit(main())
