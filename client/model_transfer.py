"""Receiving a base model from the server chunk by chunk: each file and the whole directory are hash-checked
before the model is installed in the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

from client.model_cache import default_cache_dir
from common.model_files import MANIFEST, file_sha256, verify_model_dir, write_manifest
from common.store import atomic_directory


def receive_model_chunk(
    sha256: str, name: str, file: str, offset: int, data: bytes, file_digest: str, file_size: int, last: bool,
    cache_dir: Path | None = None,
) -> bool:
    """Write one chunk of a model sent by the server; on the last one verify every hash and install it.

    Returns True once the model is installed. A file whose hash does not match is refused, and the model
    is installed only if the whole directory hashes to what the server announced.
    """
    cache_dir = cache_dir or default_cache_dir()
    if Path(file).name != file or file == MANIFEST:
        raise ValueError(f"refusing model file name {file!r} from the server")
    staging = cache_dir / "incoming" / sha256
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / file, "r+b" if offset else "wb") as f:
        f.seek(offset)
        f.write(data)
    if offset + len(data) >= file_size:
        if file_sha256(staging / file) != file_digest:
            (staging / file).unlink()
            raise ValueError(f"model file {file!r} arrived corrupted (sha256 mismatch)")
    if not last:
        return False
    try:
        verify_model_dir(staging, expected=sha256)
    except ValueError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with atomic_directory(cache_dir / "models" / f"sha256-{sha256[:16]}") as installed:
        for path in staging.iterdir():
            path.rename(installed / path.name)
        write_manifest(installed, name)
    staging.rmdir()
    return True
