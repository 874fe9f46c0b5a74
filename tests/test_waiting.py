"""Waiting for replies is nearly free and ends at once: the simulation engine's message loop backs off while
nothing is queued, and both it and the server's wait for replies end the moment the engine's state stores one."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from queue import Queue
from typing import Any

import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import InMemoryGrid

from bench.engine_pass import SERVER_IDENTITY, flower_link_state
from server.exchange import PULL_SHARE, exchange
from simulation.waiting import (
    LONGEST_WAIT,
    SHORTEST_WAIT,
    StoreEvents,
    install_patient_extractor,
    next_wait,
    patient_extractor,
    signal_stores,
    take_messages,
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


def _flower_state(nodes: int, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int], InMemoryGrid]:
    """Flower's in-memory link state with `nodes` registered nodes, as its simulation sets it up, and its grid."""
    for name, value in SERVER_IDENTITY.items():
        monkeypatch.setattr(TaskIdentity, name, value)
    return flower_link_state(nodes)


def test_a_pass_walks_flowers_stored_messages_once_and_takes_what_its_node_queries_would(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    state, nodes, grid = _flower_state(300, monkeypatch)
    twice = nodes[::60]  # five nodes get a second message
    pushed = list(grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]))
    pushed += grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="train") for n in twice])
    checked: list[int] = []
    check = state._check_stored_messages

    def counted_check(message_ids: set[str], run_id: int | None = None) -> None:
        checked.append(len(message_ids))
        check(message_ids, run_id)

    monkeypatch.setattr(state, "_check_stored_messages", counted_check)
    taken = take_messages(state, nodes)
    assert [m.metadata.dst_node_id for m in taken] == nodes  # one a node, in the nodes' order
    assert [m.metadata.message_id for m in taken] == pushed[:300]  # each node's first, as get_message_ins gives it
    assert all(m.metadata.delivered_at for m in taken)
    assert sum(checked) == 305  # Flower's own pass checks up to 300 x 305 stored messages
    assert [m.metadata.message_id for m in take_messages(state, nodes)] == pushed[300:]
    assert take_messages(state, nodes) == [] and sum(checked) == 3 * 305


def test_the_server_pulls_no_more_often_than_a_small_share_of_its_time_allows(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pull asks Flower's state about every reply still awaited; with a wait that ends at each stored reply,
    the server had pulled once a reply (5,656 nodes: most of its time). Here 400 nodes answer one by one."""
    state, nodes, grid = _flower_state(400, monkeypatch)
    events, stop = StoreEvents(), threading.Event()
    signal_stores(state, events)
    grid.wait_for_reply = functools.partial(wait_for_reply, events=events)  # type: ignore[attr-defined]
    pulls: list[tuple[float, float]] = []  # (start, seconds) of each pull
    pull = grid.pull_messages

    def timed_pull(message_ids: list[str]) -> list[Message]:
        start = time.monotonic()
        replies = list(pull(message_ids))
        pulls.append((start, time.monotonic() - start))
        return replies

    def answer() -> None:  # the nodes: each reply stored on its own, as the engine's workers store them
        while not stop.is_set():
            for message in take_messages(state, nodes):
                reply = Message(RecordDict(), reply_to=message)
                reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                state.store_message_res(reply)
                time.sleep(0.002)
            time.sleep(0.01)

    monkeypatch.setattr(grid, "pull_messages", timed_pull)
    nodes_thread = threading.Thread(target=answer)
    nodes_thread.start()
    try:
        replies = exchange(grid, [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes], 60)
    finally:
        stop.set()
        nodes_thread.join()
    assert [r.metadata.src_node_id for r in replies] == sorted(nodes)
    span = pulls[-1][0] - pulls[0][0]
    assert span > 0.5 and len(pulls) < 200  # a pull after each reply would be one for each of the 400
    assert sum(seconds for _, seconds in pulls[:-1]) <= PULL_SHARE * span + 0.01
