"""The ClientApp mod that writes the client side of the audit log: every message in and every reply out."""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from common.audit_log import append_jsonl, log_message


def client_audit_dir(context: Context) -> Path | None:
    """Node config 'audit-dir' (a SuperNode's, or filled in by node_config_mod); None disables client logging."""
    audit_dir = context.node_config.get("audit-dir")
    return Path(str(audit_dir)) if audit_dir else None


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: log the incoming message and the outgoing reply (keyed by the incoming message id)."""
    audit_dir = client_audit_dir(context)
    if audit_dir is None:
        return call_next(msg, context)
    node = context.node_id
    log_message(audit_dir, "client", "in", msg, msg.metadata.src_node_id, node, msg.metadata.message_id)
    try:
        reply = call_next(msg, context)
    except Exception as e:  # the runtime turns it into an error reply; note that no content left
        append_jsonl(audit_dir / "client.jsonl", {
            "time": time.time(), "pid": os.getpid(), "side": "client", "direction": "out", "src": node,
            "dst": msg.metadata.src_node_id,
            "message_id": msg.metadata.message_id, "message_type": msg.metadata.message_type,
            "run": msg.metadata.run_id, "round": None,
            "error": f"{type(e).__name__}: {e}", "records": {}, "bytes": 0, "content_sha256": None,
        })
        raise
    log_message(audit_dir, "client", "out", reply, node, msg.metadata.src_node_id, msg.metadata.message_id)
    return reply
