"""Waiting that costs (almost) nothing in the simulation driver.

While every node's message is out, Flower's simulation engine (flwr 1.42, `vce_api.add_messages_to_queue`) asks
its link state for each node's next message ten times a second, whether or not anything was sent: with 120 nodes
that is 1,200 state queries a second, each scanning the stored messages, a quarter of a core on a 2-core machine
(docs/benchmarks.md). Flower has no setting for it, so `patient_extractor` takes its place: the same loop, which
waits longer (up to `LONGEST_WAIT`) after each pass that found nothing and goes back to `SHORTEST_WAIT` as soon as
one finds a message. A phase's messages are all pushed at once, so the first pass queues them all; the longer
waits only ever delay the next phase's start, by at most `LONGEST_WAIT`.
"""

from __future__ import annotations

import threading
from queue import Queue
from typing import Any

SHORTEST_WAIT = 0.1  # Flower's own interval
LONGEST_WAIT = 1.0


def patient_extractor(state: Any, queue: Queue, nodes_mapping: dict, f_stop: threading.Event) -> None:
    """Flower's `add_messages_to_queue` (same arguments and effect), backing off while nothing is waiting."""
    wait = SHORTEST_WAIT
    while not f_stop.is_set():
        found = 0
        for node_id in nodes_mapping.keys():
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
                found += 1
        wait = SHORTEST_WAIT if found else min(LONGEST_WAIT, wait * 2)
        f_stop.wait(wait)


def install_patient_extractor() -> None:
    """Make Flower's simulation engine use `patient_extractor`; refuses a Flower whose engine has no such loop.
    (The engine's module is imported here, with the engine, not by every command that imports this one.)"""
    from flwr.server.superlink.fleet.vce import vce_api

    if not callable(getattr(vce_api, "add_messages_to_queue", None)):
        raise RuntimeError("flwr's simulation engine has no add_messages_to_queue to replace (flwr changed): "
                           "update simulation/waiting.py for this flwr version")
    vce_api.add_messages_to_queue = patient_extractor
