"""Giving a worker's freed heap back to the OS after each message.

glibc keeps freed memory in its arenas: after one user's training a worker held about 650 MB it no longer
used (SmolLM2, bf16), and that stays counted in its RSS for the rest of the run, on top of the next user's
peak. Trimming after each message costs about 20 ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # musl or macOS: nothing to do


def return_freed_memory() -> bool:
    """Ask glibc to hand free heap pages back to the OS; False where the C library cannot."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def free_memory_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: run the handler, then return what it freed to the OS."""
    try:
        return call_next(msg, context)
    finally:
        return_freed_memory()
