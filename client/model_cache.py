"""The node's model cache: where it is, and finding an intact model by its content hash.

No torch here: the announce and model-chunk handlers use it, and a SuperNode starts a fresh ClientApp process for
each message (loading a model is client/model_loading.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.model_files import MANIFEST, verify_model_dir
from common.store import atomic_write_json, read_saved_state

log = logging.getLogger(__name__)


CACHE_DIR_HELP = "model cache (default: $OPPU_CACHE_DIR, else ~/.cache/oppu-fl)"  # --cache-dir, as below


def default_cache_dir() -> Path:
    """Model cache: $OPPU_CACHE_DIR, else ~/.cache/oppu-fl."""
    return Path(os.environ.get("OPPU_CACHE_DIR", Path.home() / ".cache" / "oppu-fl"))


def model_slug(name: str) -> str:
    """A directory name for a model name or path."""
    return "".join(c if c.isalnum() or c in "-_." else "--" for c in name.strip("/"))


def find_model_by_hash(sha256: str, cache_dir: Path | None = None) -> Path | None:
    """An intact model directory in the cache whose manifest records this content hash (a damaged one is passed
    over, so the node gets the model sent again)."""
    models = (cache_dir or default_cache_dir()) / "models"
    for manifest in sorted(models.glob(f"*/{MANIFEST}")) if models.is_dir() else []:
        if (read_saved_state(manifest) or {}).get("sha256") == sha256:
            problem = cache_problem(manifest.parent)
            if problem is None:
                return manifest.parent
            log.warning("model cache %s: %s; not used", manifest.parent, problem)
    return None


_intact: dict[Path, list] = {}  # model directories verified in this process, with the file stats they had then


def cache_problem(model_dir: Path) -> str | None:
    """What is wrong with a model directory of the cache (None: intact): missing, no readable manifest (half made),
    or files that do not hash to the manifest's sha256 (truncated, altered). The full hash (0.5 s for SmolLM2, about
    14 s for an 8B base) runs again only when a file's size, times or inode differ from when it last passed, which
    the cache remembers across processes (`_verified_record`)."""
    if not model_dir.is_dir():
        return "missing"
    manifest = read_saved_state(model_dir / MANIFEST)
    if not manifest or not isinstance(manifest.get("sha256"), str):
        return f"no readable {MANIFEST} (a directory left half made)"
    stats = [[p.name, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino]
             for p in sorted(model_dir.iterdir()) for s in [p.stat()]]
    passed = {"sha256": manifest["sha256"], "files": stats}
    record = _verified_record(model_dir)
    if _intact.get(model_dir) == stats or (record.is_file() and read_saved_state(record) == passed):
        _intact[model_dir] = stats
        return None
    try:
        verify_model_dir(model_dir)
    except ValueError:
        return "its files do not match the sha256 in its manifest (truncated or altered)"
    _intact[model_dir] = stats
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, passed)
    except OSError as e:  # a cache this process may read but not write: it hashes again next time
        log.debug("cannot record the check of %s: %s", model_dir, e)
    return None


def _verified_record(model_dir: Path) -> Path:
    """Where the cache remembers that a model directory passed its hash check, and its files' stats then: a
    SuperNode starts a process for every message, which would otherwise hash the whole model each time. (Beside
    the models, not in their directories, whose every file the model hash covers and the server sends.)"""
    return model_dir.parent.parent / "verified" / f"{model_dir.name}.json"
