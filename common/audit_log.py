"""Audit log of exchanged messages: one JSON line per message, written by both sides.

`describe` turns a message into what an auditor needs without the bulk: record keys, tensor names, shapes,
dtypes, sizes and hashes, config/metric keys and their (small) values, and a content hash that both sides
compute alike. Each side writes with its own code: client/audit_mod.py and server/audited_grid.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message

from common import protocol as p

_INLINE_LIMIT = 4096  # config strings/bytes longer than this are logged by hash only


def tensor_sha256(array: np.ndarray) -> str:
    """Hash of a tensor's dtype, shape and values (the same for a sent Array and a stored safetensors tensor)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _raw_hits(raw: bytes, canaries: tuple[str, ...]) -> list[str]:
    return [c for c in canaries if c.encode() in raw]


def _value(value: Any, canaries: tuple[str, ...]) -> Any:
    if isinstance(value, list):  # (SecAgg+ sends lists of keys, ciphertexts and masked vectors)
        return [_value(v, canaries) for v in value]
    if isinstance(value, bytes):
        entry: dict[str, Any] = {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
        if hits := _raw_hits(value, canaries):
            entry["canaries"] = hits
        return entry
    if isinstance(value, str) and len(value) > _INLINE_LIMIT:
        return {"chars": len(value), "sha256": hashlib.sha256(value.encode()).hexdigest(),
                **({"canaries": hits} if (hits := _raw_hits(value.encode(), canaries)) else {})}
    return value


def _config_bytes(record: ConfigRecord) -> int:
    """Flower's ConfigRecord.count_bytes, which raises on an empty string or list (SecAgg+ sends empty lists):
    keys, plus 1 per bool, 8 per number, the length of a string or bytes, for each value or list element."""
    def size(value: Any) -> int:
        return 1 if isinstance(value, bool) else len(value) if isinstance(value, (str, bytes)) else 8

    return sum(len(k) + sum(size(x) for x in (v if isinstance(v, list) else [v])) for k, v in record.items())


def describe(msg: Message, canaries: tuple[str, ...] = ()) -> dict[str, Any]:
    """Records of a message as plain data, plus its content hash and byte size."""
    records: dict[str, Any] = {}
    size = 0
    if msg.has_content():
        for key, record in msg.content.array_records.items():
            tensors = []
            for name, array in record.items():
                values = array.numpy()
                entry = {"name": name, "shape": list(values.shape), "dtype": str(values.dtype),
                         "bytes": int(values.nbytes), "sha256": tensor_sha256(values)}
                if hits := _raw_hits(values.tobytes(), canaries):
                    entry["canaries"] = hits
                tensors.append(entry)
            records[key] = {"type": "arrays", "tensors": tensors}
            size += record.count_bytes()
        for key, record in msg.content.config_records.items():
            records[key] = {"type": "config", "values": {k: _value(v, canaries) for k, v in record.items()}}
            size += _config_bytes(record)
        for key, record in msg.content.metric_records.items():
            records[key] = {"type": "metrics", "values": dict(record)}
            size += record.count_bytes()
    content = json.dumps(records, sort_keys=True, default=str)
    config = next((r["values"] for r in records.values() if r["type"] == "config"), {})
    return {
        "message_type": msg.metadata.message_type,
        "run": msg.metadata.run_id,
        "round": config.get(p.SERVER_ROUND),
        "error": msg.error.reason if msg.has_error() else None,
        "records": records,
        "bytes": size,
        "content_sha256": hashlib.sha256(content.encode()).hexdigest(),
    }


def append_jsonl(path: Path, entry: dict[str, Any]) -> None:
    """Append one line with a single O_APPEND write, so concurrent writers never interleave a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@cache
def load_canaries(audit_dir: Path) -> tuple[str, ...]:
    """Canary strings planted in users' histories for this run (none if the run planted none)."""
    path = audit_dir / "canaries.json"
    return tuple(json.loads(path.read_text()).values()) if path.exists() else ()


def audit_entry(audit_dir: Path, side: str, direction: str, msg: Message, src: int, dst: int) -> dict[str, Any]:
    """The audit line, less its message id, for a message seen by `side` ("server"/"client") going `direction`
    ("out"/"in"). Its "run" (Flower's run id) tells the attempts of a resumed run apart, its "pid" a message run
    again on a new worker after its first worker died."""
    return {"time": time.time(), "pid": os.getpid(), "side": side, "direction": direction, "src": src, "dst": dst,
            **describe(msg, load_canaries(audit_dir))}


def log_message(audit_dir: Path, side: str, direction: str, msg: Message, src: int, dst: int, message_id: str) -> None:
    """Append the audit line of one message to <audit_dir>/<side>.jsonl."""
    append_jsonl(audit_dir / f"{side}.jsonl",
                 {**audit_entry(audit_dir, side, direction, msg, src, dst), "message_id": message_id})
