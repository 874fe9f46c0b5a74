"""Flower's command lines (flower-superlink, flower-supernode, `flwr supernode register`, `flwr run`) and the
environment and connection config they run with."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from common.config import RunConfig, UserCounts
from common.store import atomic_write_text
from simulation.deploy.processes import free_ports

CONNECTION = "oppu"


def _bin(name: str) -> str:
    """A command installed beside this Python (this environment's Flower), whatever PATH holds."""
    return str(Path(sys.executable).parent / name)


def launcher_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every process we start: Flower's CLI and SuperNodes keep their state in `flwr_home`, no
    `uv sync` reinstalls torch, and the SuperLink/SuperNode find flower-superexec beside this Python."""
    return {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def write_connection(flwr_home: Path, address: str, ca: Path | None = None) -> None:
    """FLWR_HOME/config.toml naming one SuperLink connection, CONNECTION, for `flwr supernode register`/`flwr run`:
    at `address` with TLS under the root certificate `ca`, or Flower's local simulation (address ":local:")."""
    tls = f'root-certificates = "{ca.resolve()}"\n' if ca else ""
    atomic_write_text(flwr_home / "config.toml", f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                                 f'address = "{address}"\n{tls}')


def local_simulation_env(flwr_home: Path) -> dict[str, str]:
    """The environment of a `flwr run` on Flower's local simulation connection, written into `flwr_home`: the local
    SuperLink it starts gets ports of its own (`flwr run` would use any local SuperLink answering on the defaults)."""
    write_connection(flwr_home, ":local:")
    http_port, control_port = free_ports(2)
    return {**launcher_env(flwr_home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}


def superlink_command(host: str, port: int, tls: tuple[Path, Path, Path], database: Path) -> list[str]:
    """flower-superlink on host:port (one HTTPS port for the Fleet and Control APIs), SuperNode authentication on."""
    ca, cert, key = tls
    return [_bin("flower-superlink"), "--host", host, "--port", str(port), "--ssl-ca-certfile", str(ca),
            "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth",
            "--database", str(database), "--disable-runtime-dependency-installation"]


def register_command(public_key: Path) -> list[str]:
    """`flwr supernode register` of one SuperNode's public key with the SuperLink of CONNECTION."""
    return [_bin("flwr"), "supernode", "register", str(public_key), CONNECTION]


def supernode_command(superlink: str, ca: Path, private: Path, node_config: dict[str, Path], port: int) -> list[str]:
    """flower-supernode joining `superlink` (host:port) with TLS and its key; `port`: its own ClientApp API, on
    this machine's loopback (one per SuperNode)."""
    config = " ".join(f"{key}='{value}'" for key, value in node_config.items())
    return [_bin("flower-supernode"), "--superlink", superlink, "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(private), "--node-config", config, "--port", str(port)]


def flwr_run_command(cfg: RunConfig, counts: UserCounts, run_dir: Path) -> list[str]:
    """`flwr run` of this project against CONNECTION with the run's config (the ServerApp writes into `run_dir` on the
    SuperLink's host)."""
    overrides = " ".join(f"{k}={_toml(v)}" for k, v in {
        **cfg.to_record(), "num-clients": counts.test, "train-clients": counts.train, "run-dir": str(run_dir),
    }.items())
    return [_bin("flwr"), "run", ".", CONNECTION, "--stream", "--run-config", overrides]


def _toml(value: object) -> str:
    """A run-config value as `--run-config` parses it (TOML: quoted strings, lower-case booleans)."""
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
