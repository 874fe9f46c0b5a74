"""A base model's identity: the sha256 over its directory's files, recorded in a manifest beside them.

Both sides need it: the server announces the hash and sends the files, a node checks what it holds or receives.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "oppu-model.json"


def directory_hash(directory: Path) -> str:
    """sha256 over (file name, file sha256) of every file but the manifest, in name order."""
    outer = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST):
        outer.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return outer.hexdigest()


def write_manifest(directory: Path, name: str) -> None:
    """Record the model's name and content hash in its directory (the last file written)."""
    (directory / MANIFEST).write_text(json.dumps({"name": name, "sha256": directory_hash(directory)}, indent=1))


def model_hash(model_dir: Path) -> str:
    """The content hash recorded when the model directory was written."""
    return json.loads((model_dir / MANIFEST).read_text())["sha256"]


def verify_model_dir(model_dir: Path, expected: str | None = None) -> str:
    """Recompute a model directory's hash and check it against `expected` (default: its manifest's, as written;
    a node receiving a model checks against what the server announced); returns the hash."""
    actual = directory_hash(model_dir)
    if actual != (expected or model_hash(model_dir)):
        what = "the announced hash" if expected else "the manifest hash"
        raise ValueError(f"{model_dir}: files do not match {what} ({actual} != {expected or model_hash(model_dir)})")
    return actual


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
