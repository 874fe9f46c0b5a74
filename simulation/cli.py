"""`flower-simulation`: the whole federated OPPU run on Flower's simulation engine (Ray backend).

Flower removed its own `flower-simulation` command; this one wraps `flwr.simulation.run_simulation`
(simulation/engine.py). It checks the flags (simulation/flags.py), runs, prints the summary table and exits by
the commands' one rule (common/exit_status.py, simulation/outcome.py): bad input, a run in which a test user could
not be evaluated or a training user's update failed (Flower itself exits 0 after failed rounds), Ctrl-C, done.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common.exit_status import FAILED
from simulation.console import setup_console
from simulation.engine import SimulationOptions, simulate
from simulation.errors import EngineStopped, SetupError
from simulation.flags import build_parser, check_run_flags, run_config_of, user_counts
from simulation.outcome import engine_stopped, exit_status, setup_failure, stop_now


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_console(args.verbose)
    cfg = run_config_of(args, parser)
    start = time.perf_counter()
    try:
        check_run_flags(args, cfg)
        run_dir, report = simulate(cfg, user_counts(args), SimulationOptions.from_args(args))
    except SetupError as e:
        return setup_failure(parser.prog, e, args.verbose)
    except EngineStopped as e:
        engine_stopped(parser.prog, _to_continue(args.run_dir), e)
    except KeyboardInterrupt:
        stop_now(parser.prog, _to_continue(args.run_dir))
    if report is None:
        print(f"{parser.prog}: the server app did not finish; see the log above ({run_dir})", file=sys.stderr)
        return FAILED
    print((run_dir / "report.md").read_text())
    print(f"wall time {time.perf_counter() - start:.0f} s; report: {run_dir / 'report.md'}; "
          f"privacy audit: oppu-audit {run_dir}")
    return exit_status(parser.prog, report, user_counts(args), args.allow_failed_updates)


def _to_continue(run_dir: Path | None) -> str:
    """How a stopped run goes on: --resume (without --run-dir: the latest run)."""
    return "run again with --resume" + (f" --run-dir {run_dir}" if run_dir else "")


if __name__ == "__main__":
    sys.exit(main())
