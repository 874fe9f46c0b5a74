"""Server-side audit: a Grid wrapper that logs every message pushed and every reply pulled.

Flower has no server-side mods, so the ServerApp talks to nodes through `AuditedGrid` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common.audit_log import append_jsonl, audit_entry, log_message
from server.exchange import exchange


class AuditedGrid(Grid):
    """Delegates to a real Grid and writes <audit_dir>/server.jsonl; `wait_for_reply` is how `exchange` waits
    between pulls and `node_order` the key it orders replies by (ServerOptions)."""

    def __init__(self, grid: Grid, audit_dir: Path, wait_for_reply: Callable[[float], None],
                 node_order: Callable[[int], int] = int):
        self._grid = grid
        self._audit_dir = audit_dir
        self.wait_for_reply = wait_for_reply
        self.node_order = node_order
        self._observers: list[Callable[[Message], None]] = []

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[override]
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Hash the messages before the push, so their lines are written the moment it returns: hashing after
        it, a run killed meanwhile would leave nodes' receipts of messages the server never logged sending."""
        messages = list(messages)
        entries = [audit_entry(self._audit_dir, "server", "out", m, 0, m.metadata.dst_node_id) for m in messages]
        ids = list(self._grid.push_messages(messages))
        pushed = set(ids)  # a message that could not be pushed (its id left out, or None) never left
        for entry, message in zip(entries, messages):
            if message.metadata.message_id in pushed:
                append_jsonl(self._audit_dir / "server.jsonl", {**entry, "message_id": message.metadata.message_id})
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        for reply in replies:
            log_message(self._audit_dir, "server", "in", reply, reply.metadata.src_node_id, 0,
                        reply.metadata.reply_to_message_id)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        def observe(reply: Message) -> None:
            for observer in list(self._observers):
                observer(reply)

        return exchange(self, list(messages), timeout if timeout is not None else float("inf"), observe)

    @contextmanager
    def observing_replies(self, on_reply: Callable[[Message], None]) -> Iterator[None]:
        """Meanwhile `on_reply` sees each reply that one of Flower's workflows (SecAgg+'s stages) collects through
        `send_and_receive`, as it arrives, after the observers set up before it: how the console shows the progress
        of a workflow whose loop is Flower's, and how the SecAgg+ sum adds each masked vector as it comes."""
        self._observers.append(on_reply)
        try:
            yield
        finally:
            self._observers.remove(on_reply)
