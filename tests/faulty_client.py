"""ClientApps that fail on purpose, for the fault tests: our handlers, with one fault at one chosen node.

Nodes are chosen by partition id (nodes.json order: test users first, then training users).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import adapt, make_client_app, node_user, personalize

Handler = Callable[[Message, Context], Message]


def _app(adapt_handler: Handler = adapt, personalize_handler: Handler = personalize) -> Callable[[Path], ClientApp]:
    return lambda run_dir: make_client_app(run_dir, adapt=adapt_handler, personalize=personalize_handler)


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def dying_worker_app(partition: int, marker: Path) -> Callable[[Path], ClientApp]:
    """The worker process personalizing node `partition` kills itself (SIGKILL) once: after the user's result is
    stored, before the reply leaves. `marker` (written first) holds its pid and the adapter's mtime."""

    def personalize_then_die(msg: Message, context: Context) -> Message:
        reply = personalize(msg, context)
        if _partition(context) == partition and not marker.exists():
            _, _, user_dir = node_user(context)
            adapter = next(user_dir.glob("adapters/*/adapter_model.safetensors"))
            marker.write_text(json.dumps({"pid": os.getpid(), "adapter": str(adapter),
                                          "mtime_ns": adapter.stat().st_mtime_ns}))
            os.kill(os.getpid(), signal.SIGKILL)
        return reply

    return _app(personalize_handler=personalize_then_die)


def failing_update_app(partition: int) -> Callable[[Path], ClientApp]:
    """Node `partition` (a training user) raises in every task-adaptation step."""

    def failing_adapt(msg: Message, context: Context) -> Message:
        if _partition(context) == partition:
            raise RuntimeError(f"task adaptation of partition {partition} fails on purpose")
        return adapt(msg, context)

    return _app(adapt_handler=failing_adapt)


def dying_before_storing_app(partition: int, marker: Path) -> Callable[[Path], ClientApp]:
    """The worker process that receives node `partition`'s personalize message kills itself (SIGKILL) once, before
    it stores anything; `marker` (written first) holds its pid."""

    def die_then_personalize(msg: Message, context: Context) -> Message:
        if _partition(context) == partition and not marker.exists():
            marker.write_text(json.dumps({"pid": os.getpid()}))
            os.kill(os.getpid(), signal.SIGKILL)
        return personalize(msg, context)

    return _app(personalize_handler=die_then_personalize)


def deadly_message_app(partition: int, marker_dir: Path) -> Callable[[Path], ClientApp]:
    """Node `partition`'s personalize message kills every worker process that runs it (SIGKILL); each victim leaves
    its pid as a file in `marker_dir`."""

    def always_die(msg: Message, context: Context) -> Message:
        if _partition(context) == partition:
            (marker_dir / str(os.getpid())).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return personalize(msg, context)

    return _app(personalize_handler=always_die)
