"""What waiting costs: the `flower-simulation` driver's CPU share while every test user's reply is outstanding.

    python -m bench.driver_wait -- --model tiny-random --num-clients 100 --personal-epochs 30   # 120 nodes
    python -m bench.driver_wait                        # 4 test users, 2 training users, SmolLM2

    python -m bench.driver_wait --analyse runs/s23/test-default     # only the delays, from an earlier run's audit

It runs `flower-simulation` (run directory runs/bench-wait-<time> unless given), reads its console, and takes the
driver process's CPU seconds from the last task-adaptation round's line to the first line of the final table: the
personalization phase, in which the driver only waits (the workers do the work, in other processes). Flower's
engine polls its link state for every node while it waits, so the share grows with the number of nodes. Over the
personalization phase (until its progress bar's last draw) it also reports the CPU share of Ray's own services
(GCS, raylet, dashboard head and agent, log monitor, ...): every process below the driver but the ClientApp workers.

What waiting costs in time, read from the run's audit logs (`message_delays`; server and nodes stamp them with
this machine's clock): how long after leaving its node the server read each reply, how long after the server
pushed a task-adaptation round its first message reached a node, and the share of the rounds' worker time that
no update ran in (the round's span times the workers, less the updates' own time on their nodes).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from bench.common import finish
from common.protocol import ADAPT
from simulation.privacy_audit import read_log

DEFAULT_FLAGS = ["--num-clients", "4", "--train-clients", "2", "--rounds", "1", "--methods", "base,oppu,oppu+rag",
                 "--task-history", "4"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.driver_wait", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/bench-wait-<time>)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--analyse", type=Path, default=None, metavar="RUN_DIR",
                        help="run nothing: print the message delays of this earlier run (its audit logs)")
    parser.add_argument("simulation_flags", nargs="*", help="flower-simulation flags after --, after the defaults")
    args = parser.parse_args(argv)
    if args.analyse:
        delays = message_delays(args.analyse)
        return finish(args, {"run_dir": str(args.analyse), **delays}, delay_lines(delays))
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
               "ray_window_seconds": ray_window, "ray_services_share": ray_cpu / ray_window, **message_delays(run_dir)}
    return finish(args, results, [*delay_lines(results),
                                  f"driver while waiting for personalization: {cpu:.1f} CPU s in {waited:.0f} s, "
                                  f"{cpu / waited:.1%} of a core",
                                  f"Ray's services during personalization ({len(last)} processes): {ray_cpu:.1f} CPU s "
                                  f"in {ray_window:.0f} s, {ray_cpu / ray_window:.1%} of a core"])


def message_delays(run_dir: Path) -> dict[str, float]:
    """Seconds messages waited on the way, by the audit logs (see the module docstring): replies read after leaving
    their node (mean, max), each task-adaptation round's first message at a node after the push (mean, max), an
    update's own time on its node (mean), and the rounds' idle share of the workers (the processes that ran one)."""
    server, nodes = (read_log(run_dir / "audit" / f"{side}.jsonl")[0] for side in ("server", "client"))
    received = {e["message_id"]: e for e in nodes if e["direction"] == "in"}
    sent = {e["message_id"]: e for e in nodes if e["direction"] == "out"}
    read = [e for e in server if e["direction"] == "in" and e["message_id"] in sent]
    late = [e["time"] - sent[e["message_id"]]["time"] for e in read]
    pushed, answered = defaultdict(list), defaultdict(list)  # a node's round messages and its replies, in time order
    for e in server:
        if e["message_type"] == ADAPT and e["direction"] == "out" and e["message_id"] in received:
            pushed[e["dst"]].append(e)
    for e in read:
        if e["message_type"] == ADAPT:
            answered[e["src"]].append(e)
    rounds = defaultdict(list)  # round: (pushed, reached the node, left it, read back), one per update
    for node, messages in pushed.items():  # rounds are synchronous: a node's reply comes before its next message
        messages.sort(key=lambda e: e["time"])
        for out, following in zip(messages, [*messages[1:], None]):
            back = next((r for r in answered[node] if out["time"] < r["time"]
                         and (following is None or r["time"] < following["time"])), None)
            if back:  # else the node never answered this round
                rounds[out["round"]].append((out["time"], received[out["message_id"]]["time"],
                                             sent[back["message_id"]]["time"], back["time"]))
    workers = len({sent[e["message_id"]]["pid"] for e in read if e["message_type"] == ADAPT}) or 1
    starts = [min(u[1] for u in updates) - min(u[0] for u in updates) for updates in rounds.values()]
    span = sum(max(u[3] for u in updates) - min(u[0] for u in updates) for updates in rounds.values())
    work = sum(u[2] - u[1] for updates in rounds.values() for u in updates)
    updates = sum(len(updates) for updates in rounds.values())
    return {
        "replies": len(late), "reply_delay_mean": statistics.fmean(late) if late else 0.0,
        "reply_delay_max": max(late, default=0.0),
        "rounds": len(rounds), "round_start_delay_mean": statistics.fmean(starts) if starts else 0.0,
        "round_start_delay_max": max(starts, default=0.0), "round_workers": workers, "round_updates": updates,
        "round_update_seconds_mean": work / updates if updates else 0.0,
        "round_idle_share": 1 - work / (span * workers) if span else 0.0,
    }


def delay_lines(delays: dict[str, float]) -> list[str]:
    """The table lines of `message_delays`."""
    return [f"replies read after leaving their node: mean {delays['reply_delay_mean']:.2f} s, max "
            f"{delays['reply_delay_max']:.2f} s ({delays['replies']} replies)",
            f"task-adaptation rounds: first message at a node {delays['round_start_delay_mean']:.2f} s after the push "
            f"(max {delays['round_start_delay_max']:.2f} s); {delays['round_updates']} updates of "
            f"{delays['round_update_seconds_mean']:.2f} s on average; {delays['round_workers']} workers idle "
            f"{delays['round_idle_share']:.0%} of the rounds ({delays['rounds']} rounds)"]


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
