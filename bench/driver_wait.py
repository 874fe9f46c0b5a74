"""What waiting costs: the `flower-simulation` driver's CPU share while every test user's reply is outstanding.

    python -m bench.driver_wait -- --model tiny-random --num-clients 100 --personal-epochs 30   # 120 nodes
    python -m bench.driver_wait                        # 4 test users, 2 training users, SmolLM2

It runs `flower-simulation` (run directory runs/bench-wait-<time> unless given), reads its console, and takes the
driver process's CPU seconds from the last task-adaptation round's line to the first line of the final table: the
personalization phase, in which the driver only waits (the workers do the work, in other processes). Flower's
engine polls its link state for every node while it waits, so the share grows with the number of nodes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from bench.common import finish

DEFAULT_FLAGS = ["--num-clients", "4", "--train-clients", "2", "--rounds", "1", "--methods", "base,oppu,oppu+rag",
                 "--task-history", "4"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.driver_wait", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/bench-wait-<time>)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("simulation_flags", nargs="*", help="flower-simulation flags after --, after the defaults")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or Path("runs") / f"bench-wait-{datetime.now():%Y%m%d-%H%M%S}"
    command = [str(Path(sys.executable).with_name("flower-simulation")), *DEFAULT_FLAGS, "--run-dir", str(run_dir),
               *args.simulation_flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    driver = psutil.Process(process.pid)
    start = end = None
    assert process.stdout is not None
    for line in process.stdout:
        mark = (time.monotonic(), sum(driver.cpu_times()[:2]))
        if "task adaptation round" in line:
            start = mark  # the last round's line: personalization starts right after it
        elif line.startswith("|") and start and not end:
            end = mark
        sys.stdout.write(line)
    if process.wait() != 0 or not (start and end):
        raise SystemExit(f"bench.driver_wait: {' '.join(command)} exited {process.returncode}; see {run_dir}")
    waited, cpu = end[0] - start[0], end[1] - start[1]
    results = {"command": command, "wait_seconds": waited, "driver_cpu_seconds": cpu, "driver_share": cpu / waited}
    return finish(args, results, [f"driver while waiting for personalization: {cpu:.1f} CPU s in {waited:.0f} s, "
                                  f"{cpu / waited:.1%} of a core"])


if __name__ == "__main__":
    main()
