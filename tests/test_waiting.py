"""Waiting for replies is nearly free and ends at once: the simulation engine's message loop backs off while
nothing is queued, and both it and the server's wait for replies end the moment the engine's state stores one."""

from __future__ import annotations

import threading
import time
from queue import Queue

import pytest

from simulation.waiting import (
    LONGEST_WAIT,
    SHORTEST_WAIT,
    StoreEvents,
    install_patient_extractor,
    next_wait,
    patient_extractor,
    signal_stores,
    wait_for_reply,
)


class CountingState:
    """Flower's LinkState as the engine's loop and the server use it: one pending message per node, handed out
    once; messages (node, text) for nodes and replies stored by the two store methods."""

    def __init__(self, nodes: list[int]) -> None:
        self.pending = {node: [f"message-{node}"] for node in nodes}
        self.replies: list[str] = []
        self.queries = 0

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        self.queries += 1
        found, self.pending[node_id] = self.pending[node_id][:limit], self.pending[node_id][limit:]
        return found

    def store_message_ins(self, message: tuple[int, str]) -> str:
        self.pending[message[0]].append(message[1])
        return message[1]

    def store_message_res(self, message: str) -> str:
        self.replies.append(message)
        return message


def _queued_within(queue: Queue, count: int, seconds: float) -> float:
    """Seconds until `queue` holds `count` items (at most `seconds`)."""
    start = time.monotonic()
    while queue.qsize() < count and time.monotonic() - start < seconds:
        time.sleep(0.005)
    return time.monotonic() - start


def test_the_loop_backs_off_while_nothing_is_queued_and_still_delivers(caplog: pytest.LogCaptureFixture) -> None:
    nodes = list(range(120))
    state, queue, stop = CountingState(nodes), Queue(), threading.Event()
    loop = threading.Thread(target=patient_extractor, args=(state, queue, {n: n for n in nodes}, stop))
    loop.start()
    time.sleep(3.0)
    assert queue.qsize() == 120  # the first pass queues every node's message
    passes = state.queries // 120
    assert passes <= 7, passes  # Flower's own loop makes 30 passes in 3 s: 0.1, then 0.2, 0.4, 0.8, 1.0, 1.0 s
    assert not caplog.records  # what was stored before the loop started needs no signal
    state.pending[7] = ["late"]  # put there behind the state's back: picked up within the longest wait, and said
    took = _queued_within(queue, 121, 2 * LONGEST_WAIT)
    stop.set()
    loop.join()
    assert queue.qsize() == 121 and took <= LONGEST_WAIT + 0.3
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "without the store signal" in caplog.text


def test_a_stored_message_ends_the_loops_wait_at_once(caplog: pytest.LogCaptureFixture) -> None:
    nodes = list(range(120))
    state, queue, stop = CountingState(nodes), Queue(), threading.Event()
    loop = threading.Thread(target=patient_extractor, args=(state, queue, {n: n for n in nodes}, stop))
    loop.start()
    time.sleep(2.0)  # backed off: 0.1, 0.2, 0.4, 0.8 and then 1 s between passes
    took = [0.0, 0.0]
    for i, node in enumerate((3, 99)):  # the next phase's messages, stored as the server's grid stores them
        state.store_message_ins((node, f"phase-2-{node}"))
        took[i] = _queued_within(queue, 121 + i, 2 * LONGEST_WAIT)
        time.sleep(1.5)
    started = time.monotonic()
    stop.set()
    loop.join()
    assert queue.qsize() == 122 and not caplog.records
    assert max(took) < 0.25, took  # a pass of 120 nodes, not the 1 s wait
    assert time.monotonic() - started < 0.25  # the engine's stop ends a wait as soon as Flower's own loop would


def test_the_servers_wait_ends_when_a_reply_is_stored() -> None:
    state, events = CountingState([]), StoreEvents()
    signal_stores(state, events)
    signal_stores(state, events)  # wrapped once only
    start = time.monotonic()
    wait_for_reply(0.2, events)  # nothing stored: the whole wait
    assert 0.19 <= time.monotonic() - start < 0.4
    threading.Timer(0.3, state.store_message_res, args=("reply-1",)).start()
    start = time.monotonic()
    wait_for_reply(5.0, events)
    assert state.replies == ["reply-1"] and 0.29 <= time.monotonic() - start < 0.5
    state.store_message_res("reply-2")  # stored before the wait begins: the wait ends at once
    start = time.monotonic()
    wait_for_reply(5.0, events)
    assert time.monotonic() - start < 0.05 and not events.reply.is_set()


def test_a_long_pass_waits_long_enough_to_cost_a_small_share() -> None:
    """With few nodes a pass is short and the wait stops at LONGEST_WAIT; with many (a pass of 0.12 s, as with 943
    nodes) it grows on to 200 passes' time, so idle passes take at most 0.5 % of the driver's time."""
    assert [next_wait(w, 0, 0.001) for w in (0.1, 0.4, 0.8, 1.0)] == [0.2, 0.8, 1.0, 1.0]
    assert next_wait(2.4, 0, 0.12) == pytest.approx(4.8) and next_wait(19.2, 0, 0.12) == pytest.approx(24.0)
    assert next_wait(24.0, 0, 0.12) == pytest.approx(24.0)
    assert next_wait(24.0, 3, 0.12) == SHORTEST_WAIT  # a find: back to Flower's own interval


def test_flowers_engine_runs_the_patient_loop() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    install_patient_extractor()
    assert vce_api.add_messages_to_queue is patient_extractor
