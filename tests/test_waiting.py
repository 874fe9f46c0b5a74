"""Waiting for replies is nearly free: the simulation engine's message loop backs off while nothing is queued."""

from __future__ import annotations

import threading
import time
from queue import Queue

import pytest

from simulation.waiting import LONGEST_WAIT, SHORTEST_WAIT, install_patient_extractor, next_wait, patient_extractor


class CountingState:
    """Flower's LinkState as the engine's loop uses it: one pending message per node, handed out once."""

    def __init__(self, nodes: list[int]) -> None:
        self.pending = {node: [f"message-{node}"] for node in nodes}
        self.queries = 0

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        self.queries += 1
        found, self.pending[node_id] = self.pending[node_id][:limit], self.pending[node_id][limit:]
        return found


def test_the_loop_backs_off_while_nothing_is_queued_and_still_delivers() -> None:
    nodes = list(range(120))
    state, queue, stop = CountingState(nodes), Queue(), threading.Event()
    loop = threading.Thread(target=patient_extractor, args=(state, queue, {n: n for n in nodes}, stop))
    loop.start()
    time.sleep(3.0)
    assert queue.qsize() == 120  # the first pass queues every node's message
    passes = state.queries // 120
    assert passes <= 7, passes  # Flower's own loop makes 30 passes in 3 s: 0.1, then 0.2, 0.4, 0.8, 1.0, 1.0 s
    state.pending[7] = ["late"]  # a later phase's message is picked up within the longest wait
    sent = time.monotonic()
    while queue.qsize() < 121 and time.monotonic() - sent < 2 * LONGEST_WAIT:
        time.sleep(0.02)
    stop.set()
    loop.join()
    assert queue.qsize() == 121 and time.monotonic() - sent <= LONGEST_WAIT + 0.3


def test_a_long_pass_waits_long_enough_to_cost_a_small_share() -> None:
    """With few nodes a pass is short and the wait stops at LONGEST_WAIT; with many (a pass of 0.12 s, as with 943
    nodes) it grows on to 40 passes' time, so idle passes take at most 2.5 % of the driver's time."""
    assert [next_wait(w, 0, 0.005) for w in (0.1, 0.4, 0.8, 1.0)] == [0.2, 0.8, 1.0, 1.0]
    assert next_wait(2.4, 0, 0.12) == pytest.approx(4.8) and next_wait(4.8, 0, 0.12) == pytest.approx(4.8)
    assert next_wait(4.8, 3, 0.12) == SHORTEST_WAIT  # a find: back to Flower's own interval


def test_flowers_engine_runs_the_patient_loop() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    install_patient_extractor()
    assert vce_api.add_messages_to_queue is patient_extractor
