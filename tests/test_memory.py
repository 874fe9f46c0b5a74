"""A worker hands the heap a handler freed back to the OS (glibc would keep it in the worker's RSS)."""

from __future__ import annotations

import gc

import psutil
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from client.memory import _libc, free_memory_mod, return_freed_memory

MIB = 2**20


def message(content: RecordDict) -> Message:
    metadata = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="", created_at=0.0, ttl=60.0, message_type="query.test")
    return Message(content, metadata=metadata)


CONTEXT = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def fragment_the_heap(msg: Message, context: Context) -> Message:
    """Allocate 300 MB in 1 KB blocks and free them: glibc keeps the freed heap unless asked to trim it."""
    blocks = [bytearray(1000) for _ in range(300_000)]
    del blocks
    gc.collect()
    return message(RecordDict({"reply": ConfigRecord({"ok": True})}))


@pytest.mark.skipif(_libc() is None, reason="not glibc: nothing to trim")
def test_free_memory_mod_returns_the_handlers_freed_heap():
    msg, context = message(RecordDict()), CONTEXT
    return_freed_memory()  # earlier tests in this process may have left free heap the blocks would reuse
    before = psutil.Process().memory_info().rss
    fragment_the_heap(msg, context)  # without the mod the freed blocks stay in RSS
    held = psutil.Process().memory_info().rss - before
    reply = free_memory_mod(msg, context, fragment_the_heap)
    after = psutil.Process().memory_info().rss - before
    assert reply.content["reply"]["ok"] is True
    assert held > 200 * MIB
    assert after < held - 200 * MIB


def test_free_memory_mod_passes_errors_on():
    msg, context = message(RecordDict()), CONTEXT

    def failing(m: Message, c: Context) -> Message:
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        free_memory_mod(msg, context, failing)
