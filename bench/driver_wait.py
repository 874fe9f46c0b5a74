"""What waiting costs: the `flower-simulation` driver's CPU share while every test user's reply is outstanding.

    python -m bench.driver_wait -- --model tiny-random --num-clients 100 --personal-epochs 30   # 120 nodes
    python -m bench.driver_wait                        # 4 test users, 2 training users, SmolLM2

It runs `flower-simulation` (run directory runs/bench-wait-<time> unless given), reads its console, and takes the
driver process's CPU seconds from the last task-adaptation round's line to the first line of the final table: the
personalization phase, in which the driver only waits (the workers do the work, in other processes). Flower's
engine polls its link state for every node while it waits, so the share grows with the number of nodes. Over the
personalization phase (until its progress bar's last draw) it also reports the CPU share of Ray's own services
(GCS, raylet, dashboard head and agent, log monitor, ...): every process below the driver but the ClientApp workers.
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
    services: list[dict[int, tuple[str, float]]] = []  # Ray's services' CPU seconds at start and when the bar ends
    services_end = 0.0
    for line in process.stdout:
        mark = (time.monotonic(), sum(driver.cpu_times()[:2]))
        if "task adaptation round" in line:
            start = mark  # the last round's line: personalization starts right after it
            services = [ray_services_cpu(driver)]
        elif "%|" in line and start and not end:  # each draw of the progress bar (a \r ends a line here):
            services[1:] = [ray_services_cpu(driver)]  # the last one, when Ray still runs, is kept
            services_end = time.monotonic()
        elif line.startswith("|") and start and not end:
            end = mark
        sys.stdout.write(line)
    if process.wait() != 0 or not (start and end):
        raise SystemExit(f"bench.driver_wait: {' '.join(command)} exited {process.returncode}; see {run_dir}")
    waited, cpu = end[0] - start[0], end[1] - start[1]
    first, last = services if len(services) == 2 else ({}, {})
    ray_cpu = sum(seconds - first[pid][1] for pid, (_, seconds) in last.items() if pid in first)
    ray_window = max(services_end - start[0], 1e-9)
    results = {"command": command, "wait_seconds": waited, "driver_cpu_seconds": cpu, "driver_share": cpu / waited,
               "ray_services": sorted({name for name, _ in last.values()}), "ray_services_cpu_seconds": ray_cpu,
               "ray_window_seconds": ray_window, "ray_services_share": ray_cpu / ray_window}
    return finish(args, results, [f"driver while waiting for personalization: {cpu:.1f} CPU s in {waited:.0f} s, "
                                  f"{cpu / waited:.1%} of a core",
                                  f"Ray's services during personalization ({len(last)} processes): {ray_cpu:.1f} CPU s "
                                  f"in {ray_window:.0f} s, {ray_cpu / ray_window:.1%} of a core"])


def ray_services_cpu(driver: psutil.Process) -> dict[int, tuple[str, float]]:
    """{pid: (name, CPU seconds)} of the processes below the driver that are Ray's own, not a ClientApp worker; a
    Python service is named by its script (dashboard.py, log_monitor.py, ...)."""
    found = {}
    for child in driver.children(recursive=True):
        try:
            name, command = child.name(), child.cmdline()
            if "ClientAppActor" in name:
                continue
            script = next((Path(part).name for part in command if part.endswith(".py")), name)
            found[child.pid] = (script, sum(child.cpu_times()[:2]))
        except psutil.NoSuchProcess:
            pass
    return found

if __name__ == "__main__":
    main()
