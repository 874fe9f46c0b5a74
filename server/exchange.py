"""Sending messages to nodes and collecting replies as they arrive, with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Message
from flwr.serverapp import Grid

SHORTEST_WAIT = 0.2  # seconds between pulls right after a reply
LONGEST_WAIT = 2.0  # while none arrives: a phase's last reply is read at most this late
PULL_SHARE = 0.05  # the most of the server's time its pulls may take: each one looks up every reply still awaited


def exchange(
    grid: Grid, messages: list[Message], timeout: float, on_reply: Callable[[Message], None] | None = None
) -> list[Message]:
    """Push messages, then collect replies as they arrive (calling `on_reply` on each) until all or timeout;
    the replies in order of their node's id (by the grid's `node_order` where it has one: AuditedGrid), so that
    nothing a run computes from them (the announced node lists that rounds sample from, FedAvg's sum) depends on
    which node answered first.

    A node that never answers within the timeout is reported as missing by the caller (no hang). Between pulls it
    waits with the grid's `wait_for_reply(seconds)` where the grid has one (the simulation's returns the moment its
    engine stores a reply: simulation/waiting.py), else sleeps. A pull costs in proportion to the replies still
    awaited (Flower's link state checks each), so pulls come no closer together than their cost over PULL_SHARE:
    with 5,656 nodes out, a pull after every reply had taken most of the server's time (docs/benchmarks.md).
    """
    pause: Callable[[float], None] = getattr(grid, "wait_for_reply", time.sleep)
    ids = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    wait = SHORTEST_WAIT
    while ids and time.monotonic() < deadline:
        started = time.monotonic()
        pulled = grid.pull_messages(list(ids))
        next_pull = started + (time.monotonic() - started) / PULL_SHARE
        for reply in pulled:
            ids.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            if on_reply:
                on_reply(reply)
        if ids:  # waiting is cheap: longer pauses while nothing arrives, short again once something does
            wait = SHORTEST_WAIT if pulled else min(LONGEST_WAIT, wait * 2)
            pause(min(wait, max(0.0, deadline - time.monotonic())))
            time.sleep(max(0.0, min(next_pull, deadline) - time.monotonic()))
    order: Callable[[int], int] = getattr(grid, "node_order", int)
    return sorted(replies, key=lambda reply: order(reply.metadata.src_node_id))
