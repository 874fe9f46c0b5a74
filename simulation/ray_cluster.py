"""`flower-simulation --ray-address`: the simulation's clients on an existing Ray cluster.

Every machine of the cluster must see the run directory at the same path (a shared filesystem): the driver writes
each simulated node's store there (clients/<user>/, nodes.json) and whichever machine runs a node's ClientApp reads
and writes that store and appends to audit/client.jsonl. The model cache need not be shared: a client lacking the base
model is sent it (hash-checked); `--cache-dir`, if given, must be shared too, since every client then looks there.
This code must be importable on every machine at the same path (as PYTHONPATH here says, or installed alike).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
from pathlib import Path

from simulation.errors import SetupError


def _sees(path: str, token: str) -> str | None:
    """On one Ray node: None if `path`/.ray-check holds `token` and `path` is writable, else what is wrong (run
    there as a Ray task, so it imports what it needs itself)."""
    import socket

    marker = Path(path) / ".ray-check"
    try:
        if marker.read_text() != token:
            return f"{socket.gethostname()}: {path} is another directory there (not the shared one)"
    except OSError as e:
        return f"{socket.gethostname()}: {path} cannot be read there ({e.strerror})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{socket.gethostname()}: {path} is not writable there"
    return None


def _unreachable(address: str, timeout: float = 10) -> str | None:
    """Why nothing answers at HOST:PORT, else None: ray.init retries an address without a GCS for minutes
    (measured: still waiting after 120 s), so one TCP connection is tried first. Other forms (`auto`, `ray://`)
    are left to Ray."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    return None


def join_ray_cluster(address: str, run_dir: Path, cache_dir: Path | None) -> None:
    """Connect this driver to the Ray cluster at `address` and check, on every alive node, that the run directory
    (and `cache_dir`) are the shared ones; a SetupError says what is missing where.

    Flower's Ray backend then uses this connection (it calls ray.init only when Ray is not initialized): joining
    here lets the check run first, and gives the workers the environment they need (Flower's own init_args cannot:
    it sets runtime_env itself). Ray is imported here: only a run with --ray-address needs it this early.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


    env = {"PYTHONPATH": os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])}
    if cache_dir:
        env["OPPU_CACHE_DIR"] = str(cache_dir.resolve())
    if why := _unreachable(address):
        raise SetupError(f"--ray-address {address}: no Ray cluster answers there ({why}); expected the address "
                         "that `ray start --head` printed (HOST:PORT)")
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SetupError(f"--ray-address {address}: cannot join a Ray cluster there ({e}); expected the address "
                         "that `ray start --head` printed (HOST:PORT)") from e
    shared = [run_dir, *([cache_dir.resolve()] if cache_dir else [])]
    token = secrets.token_hex(8)
    try:
        for path in shared:
            path.mkdir(parents=True, exist_ok=True)
            (path / ".ray-check").write_text(token)
        check = ray.remote(num_cpus=0)(_sees)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        problems = [p for p in ray.get([
            check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(str(path), token) for node in nodes for path in shared
        ], timeout=120) if p]
    finally:
        for path in shared:
            (path / ".ray-check").unlink(missing_ok=True)
    if problems:
        ray.shutdown()
        raise SetupError(f"--ray-address {address}: every machine of the cluster must see the run directory"
                         f"{' and --cache-dir' if cache_dir else ''} at the same path (a shared filesystem): "
                         + "; ".join(problems))
    logging.getLogger("oppu").info("Ray cluster %s: %d node(s) see %s", address, len(nodes),
                                   ", ".join(map(str, shared)))
