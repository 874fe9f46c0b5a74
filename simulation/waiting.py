"""Waiting that costs (almost) nothing in the simulation driver.

While every node's message is out, Flower's simulation engine (flwr 1.42, `vce_api.add_messages_to_queue`) asks
its link state for each node's next message ten times a second, whether or not anything was sent: with 120 nodes
that is 1,200 state queries a second, each scanning the stored messages, a quarter of a core on a 2-core machine
(docs/benchmarks.md). Flower has no setting for it, so `patient_extractor` takes its place: the same loop, which
waits longer (up to `LONGEST_WAIT`) after each pass that found nothing and goes back to `SHORTEST_WAIT` as soon as
one finds a message. A phase's messages are all pushed at once, so the first pass queues them all; the longer
waits only ever delay the next phase's start, by at most the longest wait: `LONGEST_WAIT`, or longer where one
pass itself is long. A pass asks for every node, and each query looks through every stored message, so with the
943 nodes of the default population one pass took about a ninth of a second: passes 1 s apart cost 12 % of a
core (docs/benchmarks.md). The longest wait is therefore at least the pass's time over `SCAN_SHARE`.
"""

from __future__ import annotations

import threading
import time
from queue import Queue
from typing import Any

SHORTEST_WAIT = 0.1  # Flower's own interval
LONGEST_WAIT = 1.0
SCAN_SHARE = 0.025  # the most of the driver's time that idle passes may take


def next_wait(wait: float, found: int, pass_seconds: float) -> float:
    """The wait after a pass that took `pass_seconds` and found `found` messages, the previous wait being `wait`:
    back to the shortest after a find, else doubled up to the longest (see the module docstring)."""
    if found:
        return SHORTEST_WAIT
    return min(max(LONGEST_WAIT, pass_seconds / SCAN_SHARE), wait * 2)


def patient_extractor(state: Any, queue: Queue, nodes_mapping: dict, f_stop: threading.Event) -> None:
    """Flower's `add_messages_to_queue` (same arguments and effect), backing off while nothing is waiting."""
    wait = SHORTEST_WAIT
    while not f_stop.is_set():
        started = time.perf_counter()
        found = 0
        for node_id in nodes_mapping.keys():
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
                found += 1
        wait = next_wait(wait, found, time.perf_counter() - started)
        f_stop.wait(wait)


def install_patient_extractor() -> None:
    """Make Flower's simulation engine use `patient_extractor`; refuses a Flower whose engine has no such loop.
    (The engine's module is imported here, with the engine, not by every command that imports this one.)"""
    from flwr.server.superlink.fleet.vce import vce_api

    if not callable(getattr(vce_api, "add_messages_to_queue", None)):
        raise RuntimeError("flwr's simulation engine has no add_messages_to_queue to replace (flwr changed): "
                           "update simulation/waiting.py for this flwr version")
    vce_api.add_messages_to_queue = patient_extractor
