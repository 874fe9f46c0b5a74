"""Atomic file writes and the node-local store of one user (data, profile, personal adapters, results).

Layout under the run directory, on the machine that holds the user:
    clients/<user>/data.json          the user's history and queries (OPPU per-user format)
    clients/<user>/profile.json       the PAG profile and what it was made from
    clients/<user>/adapters/<name>/   personal adapters (peft save_pretrained files)
    clients/<user>/predictions.json   per-method predictions with golds (never sent)
    clients/<user>/result.json        per-method metric statistics (what was sent to the server)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """atomic_write_bytes of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    """JSON counterpart of atomic_write_text."""
    atomic_write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None if there is no such file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


@contextmanager
def atomic_directory(target: Path, replace: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside `target`; it takes `target`'s place only when complete.

    If `target` exists by then: with `replace` it is swapped out, otherwise the new copy is dropped
    (another process made the same thing first, e.g. a model cache entry).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield staging
        if target.exists() and replace:
            shutil.rmtree(target)
        if not target.exists():
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)




class UserStore:
    """Paths of one user's node-local files."""

    def __init__(self, run_dir: Path, user_id: str):
        self.root = Path(run_dir) / "clients" / user_id

    @property
    def data(self) -> Path:
        return self.root / "data.json"

    @property
    def profile(self) -> Path:
        return self.root / "profile.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.json"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    def adapter(self, name: str) -> Path:
        return self.root / "adapters" / name
