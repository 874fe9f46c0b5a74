"""Base-model distribution: announce (name, sha256) to every node; send the files to nodes that lack them."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import protocol as p
from common.model_files import MANIFEST, file_sha256
from server.exchange import exchange

log = logging.getLogger(__name__)

CHUNK_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class NodeInfo:
    """What a node told the server about itself at announce time."""

    node_id: int
    role: str
    had_model: bool


def announce(grid: Grid, model_name: str, model_sha: str, timeout: float) -> tuple[list[NodeInfo], list[Message]]:
    """Ask every node for its role and whether it holds the base model; (nodes, failed replies)."""
    config = ConfigRecord({p.MODEL_NAME: model_name, p.MODEL_SHA256: model_sha})
    messages = [
        Message(RecordDict({p.CONFIG: config}), dst_node_id=node, message_type=p.ANNOUNCE)
        for node in grid.get_node_ids()
    ]
    replies = exchange(grid, messages, timeout)
    nodes = [
        NodeInfo(r.metadata.src_node_id, str(r.content[p.CONFIG][p.ROLE]), bool(r.content[p.CONFIG][p.HAS_MODEL]))
        for r in replies
        if not r.has_error()
    ]
    return nodes, [r for r in replies if r.has_error()]


def model_chunks(model_dir: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[str, int, bytes, str, int, bool]]:
    """(file, offset, data, file sha256, file size, last) for every model file but the manifest, in name order, read
    as it is sent: the server holds one chunk of the model at a time, not the model (an 8B base is 16 GB)."""
    files = sorted(f for f in model_dir.iterdir() if f.is_file() and f.name != MANIFEST)
    for index, path in enumerate(files):
        digest, size = file_sha256(path), path.stat().st_size
        with open(path, "rb") as f:
            for offset in range(0, max(size, 1), chunk_bytes):  # an empty file is one empty chunk
                last = index == len(files) - 1 and offset + chunk_bytes >= size
                yield path.name, offset, f.read(chunk_bytes), digest, size, last


def send_model(grid: Grid, nodes: Iterable[int], model_dir: Path, model_name: str, model_sha: str, timeout: float) -> set[int]:
    """Stream the model's files to `nodes` chunk by chunk; returns the nodes that installed it."""
    nodes = list(nodes)
    if not nodes:
        return set()
    installed: set[int] = set()
    for name, offset, data, digest, size, last in model_chunks(model_dir):
        config = ConfigRecord(
            {
                p.MODEL_NAME: model_name, p.MODEL_SHA256: model_sha, p.CHUNK_FILE: name, p.CHUNK_OFFSET: offset,
                p.CHUNK_DATA: data, p.CHUNK_FILE_SHA256: digest, p.CHUNK_FILE_SIZE: size, p.CHUNK_LAST: last,
            }
        )
        messages = [
            Message(RecordDict({p.CONFIG: config}), dst_node_id=node, message_type=p.MODEL_CHUNK) for node in nodes
        ]
        replies = exchange(grid, messages, timeout)
        for reply in replies:
            if reply.has_error():
                log.error("node %s failed to store model chunk %s: %s", reply.metadata.src_node_id, name, reply.error.reason)
            elif reply.content[p.CONFIG][p.CHUNK_STORED]:
                installed.add(reply.metadata.src_node_id)
    log.info("base model sent to %d node(s), installed on %d", len(nodes), len(installed))
    return installed
