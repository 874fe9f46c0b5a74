"""Waiting that costs (almost) nothing in the simulation driver, and ends as soon as there is something to do.

While every node's message is out, Flower's simulation engine (flwr 1.42, `vce_api.add_messages_to_queue`) asks
its link state for each node's next message ten times a second, whether or not anything was sent: with 120 nodes
that is 1,200 state queries a second, each scanning the stored messages, a quarter of a core on a 2-core machine
(docs/benchmarks.md). Flower has no setting for it, so `patient_extractor` takes its place: the same loop, which
waits longer (up to `LONGEST_WAIT`) after each pass that found nothing and goes back to `SHORTEST_WAIT` as soon as
one finds a message. Flower's pass asks for every node, and each query looks through every stored message, so with
the 943 nodes of the default population one pass took about a ninth of a second: passes 1 s apart cost 12 % of a
core (docs/benchmarks.md). The longest wait is therefore at least the pass's time over `SCAN_SHARE`; and a pass
now looks through the stored messages once for all nodes (`take_messages`), which matters most while every node
has a message out (the item-table round: 5,656 nodes made Flower's pass 32 million checks).

Backing off alone made every phase start late: a round's messages sat in the state until the loop's next pass,
up to 4.4 s later with 943 nodes, and the server read a round's last reply up to `server.exchange`'s longest wait
late, in each of the 40 task-adaptation rounds (docs/benchmarks.md, session 24). So the engine's state now says
when it stores something: `signal_stores` makes its two store methods set an event (`STORES`), the loop's wait
ends at the message event, and the server's wait between pulls ends at the reply event (`wait_for_reply`, which
the simulation hands the server as `ServerOptions.wait_for_reply`). An idle pass now only finds what was stored
without a signal, which Flower 1.42 never does, so the passes are rarer (`SCAN_SHARE`: 22 s apart with 943 nodes);
should one find an unannounced message (a Flower that stores another way), the loop says so, once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from queue import Queue
from typing import Any

from flwr.supercore.date import now

SHORTEST_WAIT = 0.1  # Flower's own interval; also how often a wait looks at the engine's stop event
LONGEST_WAIT = 1.0
SCAN_SHARE = 0.005  # the most of the driver's time that idle passes may take

log = logging.getLogger(__name__)

# the engine's node id -> partition id, as its loop was handed them: under `flwr run`, where Flower drew the ids
# before any app of ours loaded, the one place that says which node holds which partition (simulation/node_ids.py)
ENGINE_NODES: dict[int, int] = {}


@dataclass(frozen=True)
class StoreEvents:
    """Set each time the engine's link state stores a message for a node, and a reply for the server."""

    message: threading.Event = field(default_factory=threading.Event)
    reply: threading.Event = field(default_factory=threading.Event)


STORES = StoreEvents()  # one engine per process, so one pair of events


def next_wait(wait: float, found: int, pass_seconds: float) -> float:
    """The wait after a pass that took `pass_seconds` and found `found` messages, the previous wait being `wait`:
    back to the shortest after a find, else doubled up to the longest (see the module docstring)."""
    if found:
        return SHORTEST_WAIT
    return min(max(LONGEST_WAIT, pass_seconds / SCAN_SHARE), wait * 2)


def signal_stores(state: Any, events: StoreEvents = STORES) -> None:
    """Make `state.store_message_ins` set `events.message` and `state.store_message_res` set `events.reply` once
    they have stored (wrapping the methods of this state object; a second call leaves them as they are)."""
    for method, event in (("store_message_ins", events.message), ("store_message_res", events.reply)):
        store: Callable[[Any], Any] = getattr(state, method)
        if getattr(store, "signals", None) is event:
            continue

        def signalled(message: Any, store: Callable[[Any], Any] = store, event: threading.Event = event) -> Any:
            try:
                return store(message)
            finally:
                event.set()

        signalled.signals = event  # type: ignore[attr-defined]
        setattr(state, method, signalled)


def pause(seconds: float, wake: threading.Event, stop: threading.Event) -> None:
    """Wait up to `seconds`, less if `wake` is set (at once) or `stop` is (within SHORTEST_WAIT)."""
    end = time.monotonic() + seconds
    while not stop.is_set() and not wake.is_set():
        left = end - time.monotonic()
        if left <= 0:
            return
        wake.wait(min(left, SHORTEST_WAIT))


def wait_for_reply(seconds: float, events: StoreEvents = STORES) -> None:
    """The server's wait between pulls for replies: up to `seconds`, over as soon as the engine stores a reply."""
    events.reply.wait(seconds)
    events.reply.clear()  # the pull that follows reads whatever was stored until now


def take_messages(state: Any, nodes: Iterable[int]) -> list[Any]:
    """For each of `nodes` that has an undelivered message, its first one, marked delivered: what Flower's
    `state.get_message_ins(node_id=node, limit=1)` gives for each node, in `nodes`' order. On Flower's
    InMemoryLinkState it takes one walk over the stored messages, where each of those calls walks them all: a pass
    over 5,656 nodes, each with a message out, made 32 million checks (most of the driver's time in the item-table
    round; docs/benchmarks.md). A state without those internals is asked node by node."""
    nodes = list(nodes)
    store = getattr(state, "message_ins_store", None)
    if not isinstance(store, dict) or not hasattr(state, "_check_stored_messages"):
        return [message for node in nodes for message in state.get_message_ins(node_id=node, limit=1)]
    wanted = set(nodes)
    with state.lock:
        state._check_stored_messages(set(store))  # Flower's expiry and federation checks, once for each message
        first: dict[int, Any] = {}
        for message in store.values():
            node = message.metadata.dst_node_id
            if message.metadata.delivered_at == "" and node not in first and node in wanted:
                first[node] = message
        delivered_at = now().isoformat()
        for message in first.values():
            message.metadata.delivered_at = delivered_at
    return [first[node] for node in nodes if node in first]


def patient_extractor(state: Any, queue: Queue, nodes_mapping: dict, f_stop: threading.Event) -> None:
    """Flower's `add_messages_to_queue` (same arguments and effect): backs off while nothing is waiting, and
    passes again as soon as the state stores a message."""
    ENGINE_NODES.update(nodes_mapping)
    signal_stores(state)
    wait = SHORTEST_WAIT
    signalled, warned = True, False  # the first pass finds what was stored before the signals were in place
    while not f_stop.is_set():
        signalled = signalled or STORES.message.is_set()
        STORES.message.clear()  # a message stored from here on ends the pause below
        started = time.perf_counter()
        found = 0
        for message in take_messages(state, nodes_mapping):
            queue.put(message)
            found += 1
        pass_seconds = time.perf_counter() - started
        if found and not (signalled or STORES.message.is_set() or warned):
            warned = True
            log.warning("Flower's link state stored %d message(s) without the store signal (simulation/waiting.py): "
                        "phases may start up to %.0f s late", found, next_wait(float("inf"), 0, pass_seconds))
        signalled = found > 0  # a node's second message waits for the next pass (one per node and pass)
        wait = next_wait(wait, found, pass_seconds)
        pause(wait, STORES.message, f_stop)


def install_patient_extractor() -> None:
    """Make Flower's simulation engine use `patient_extractor`; refuses a Flower whose engine has no such loop.
    (The engine's module is imported here, with the engine, not by every command that imports this one.)"""
    from flwr.server.superlink.fleet.vce import vce_api

    if not callable(getattr(vce_api, "add_messages_to_queue", None)):
        raise RuntimeError("flwr's simulation engine has no add_messages_to_queue to replace (flwr changed): "
                           "update simulation/waiting.py for this flwr version")
    vce_api.add_messages_to_queue = patient_extractor
