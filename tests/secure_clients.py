"""ClientApps for the secure-aggregation tests: our handlers, where each training node also keeps the vector it
gave SecAgg+ in clear in its own store (what the server must never see), one node may drop out mid-protocol, and
one may leak its update beside the masked one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.common import ndarray_to_bytes

from client.app import adapt_secure, make_client_app, node_user
from common import protocol as p

CLEAR_VECTOR = "secure-vector-round-{}.npz"  # in the node's store: its packed vector before masking


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _recording_adapt(msg: Message, context: Context) -> Message:
    reply = adapt_secure(msg, context)
    _, _, user_dir = node_user(context)
    vector = [a.numpy() for a in reply.content[p.FITRES_ARRAYS].values()]
    server_round = int(msg.content[p.FITINS_CONFIG][p.SERVER_ROUND])
    np.savez(user_dir / CLEAR_VECTOR.format(server_round), *vector)
    return reply


def dropout_app(partition: int) -> Callable[[Path], ClientApp]:
    """Recording nodes; node `partition` drops out after the key sharing: it fails in the collect stage, so the
    server must unmask the others with the key shares of its secrets that they hold."""

    def adapt_or_drop(msg: Message, context: Context) -> Message:
        if _partition(context) == partition:
            raise RuntimeError(f"partition {partition} drops out of secure aggregation on purpose")
        return _recording_adapt(msg, context)

    return lambda run_dir: make_client_app(run_dir, adapt_secure=adapt_or_drop)


def leaky_app(partition: int) -> Callable[[Path], ClientApp]:
    """Recording nodes; node `partition` also sends its clear vector in the FitRes metrics (secaggplus_mod masks
    the FitRes arrays only)."""

    def leaky_adapt(msg: Message, context: Context) -> Message:
        reply = _recording_adapt(msg, context)
        if _partition(context) == partition:
            vector = [a.numpy() for a in reply.content[p.FITRES_ARRAYS].values()]
            # (one bytes value: the mod reads FitRes metrics as legacy scalars)
            reply.content[p.FITRES_METRICS] = ConfigRecord({"update": b"".join(ndarray_to_bytes(a) for a in vector)})
        return reply

    return lambda run_dir: make_client_app(run_dir, adapt_secure=leaky_adapt)


def clear_vectors(run_dir: Path, server_round: int) -> dict[str, list[np.ndarray]]:
    """User id -> the clear vector that user's node recorded for `server_round`."""
    vectors = {}
    for path in sorted(run_dir.glob(f"clients/*/{CLEAR_VECTOR.format(server_round)}")):
        with np.load(path) as saved:
            vectors[path.parent.name] = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    return vectors
