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
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


class JsonFileError(ValueError):
    """A JSON file that cannot be read or decoded; the message is one line that names the file and what is wrong."""


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number (non-finite values are refused)")


def load_json_file(path: Path, finite: bool = False) -> Any:
    """The JSON in `path`; any file it cannot be (missing, a directory, unreadable, not UTF-8, not JSON, nested
    deeper than Python can hold, or with NaN/Infinity where `finite`) is a JsonFileError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_constant=_refuse_constant if finite else None)
    except FileNotFoundError:
        raise JsonFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise JsonFileError(f"{path}: is a directory; expected a JSON file") from None
    except OSError as e:
        raise JsonFileError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise JsonFileError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                            "expected UTF-8 JSON") from None
    except RecursionError:
        raise JsonFileError(f"{path}: JSON nested too deeply to read (Python's limit is about "
                            f"{sys.getrecursionlimit()} levels)") from None
    except ValueError as e:  # json.JSONDecodeError included
        raise JsonFileError(f"{path}: not valid JSON ({e})") from None


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None if there is no such file; a damaged one is a JsonFileError naming it."""
    return load_json_file(path) if path.exists() else None


def read_saved_state(path: Path) -> dict | None:
    """A cache this program wrote (a stored result, profile, task adapter record) for reuse: None if missing or
    damaged (then logged with the file named), so the caller recomputes it instead of failing the run."""
    try:
        state = read_json(path)
    except JsonFileError as e:
        log.warning("%s; recomputing it", e)
        return None
    if state is not None and not isinstance(state, dict):
        log.warning("%s: expected a JSON object, got %s; recomputing it", path, type(state).__name__)
        return None
    return state


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
