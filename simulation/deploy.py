"""`oppu-deploy`: real Flower processes (SuperLink, SuperNodes, `flwr run`) with TLS and SuperNode authentication.

`local` (also the bare form) is the quick path: one SuperLink and N SuperNodes on 127.0.0.1, then `flwr run`. The
other roles split the same over machines (docs/deployment.md): `superlink` on a coordinator (CA made once and kept,
a certificate for the names machines use), `partition` (one data file per user), `supernode` on each device machine
(one SuperNode per local user file), `register` (node public keys), `run` (`flwr run` against the SuperLink). Every
process started is stopped by PID, with every process below it, at the end, on failure and on Ctrl-C; if oppu-deploy
itself is killed (even by SIGKILL), a watchdog process kills them.

Layout of the quick path, under the run directory:
    deploy/tls/                 ca.pem, ca.key, superlink.pem, superlink.key
    deploy/nodes/<i>/           node key pair, model cache
    deploy/flwr-home/           FLWR_HOME for the CLI (connection "oppu")
    deploy/logs/                superlink.log, register-<i>.log, supernode-<i>.log, flwr-run.log, watchdog.log
    clients/<user>/             node-local stores, as in the simulation; audit/ both sides' logs
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.config import PHASE_TIMEOUT, RunConfig, UserCounts
from common.store import (
    UserStore,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from simulation.errors import SetupError

CONNECTION = "oppu"
REPO = Path(__file__).resolve().parents[1]


def _write_private(path: Path, data: bytes) -> None:
    """A key file only its owner may read (made so before the key is in it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(name: str) -> x509.GeneralName:
    """A certificate name: an IP address, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_tls(directory: Path, names: list[str], days: int = 2) -> tuple[Path, Path, Path]:
    """A SuperLink certificate whose names are `names` (hostnames or IPs), signed by the CA in `directory`
    (ca.pem, ca.key: made on first use, then kept, so machines that hold ca.pem stay valid across restarts);
    (ca.pem, superlink.pem, superlink.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    if ca_path.exists() and ca_key_path.exists():
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key = cast(ec.EllipticCurvePrivateKey, serialization.load_pem_private_key(ca_key_path.read_bytes(), None))
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "OPPU-FL CA")])
        ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(ca_key_path, ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        atomic_write_bytes(ca_path, ca.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(min(now + dt.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in dict.fromkeys(names)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "superlink.pem", directory / "superlink.key"
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return ca_path, cert_path, key_path


def make_node_keys(directory: Path) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format, as SuperNode authentication expects: (private, public); an existing pair in
    `directory` is kept (its public key may already be registered)."""
    private, public = directory / "node_key", directory / "node_key.pub"
    if private.exists() and public.exists():
        return private, public
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    atomic_write_bytes(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH))
    return private, public


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen) -> None:
    """Until `host:port` accepts connections (a bind-all address: its loopback, as Flower's SuperExec does)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited with {process.returncode} before listening on "
                               f"{host}:{port}")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `processes` still running (a zombie has exited; it only waits to be reaped)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def stop_trees(roots: list[psutil.Process], grace: float) -> None:
    """Stop each running root and every process below it (SuperExec, ServerApp, ClientApps), which may have left
    its session: TERM, up to `grace` seconds to exit, then KILL (at once with grace 0)."""
    victims: list[psutil.Process] = []
    for root in running(roots):
        try:
            victims += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + grace
    for how in ("terminate", "kill") if grace else ("kill",):
        for victim in reversed(running(victims)):  # the deepest first
            try:
                getattr(victim, how)()
            except psutil.NoSuchProcess:
                pass
        while running(victims) and time.monotonic() < deadline:
            time.sleep(0.1)


def watch_launcher() -> None:
    """The watchdog: reads the pids of the processes oppu-deploy starts, one a line, from stdin. Its stdin ends when
    oppu-deploy exits, however it exits (a SIGKILL too closes the pipe's other end): it then kills what is left."""
    started = []
    for line in sys.stdin:
        try:
            started.append(psutil.Process(int(line)))  # psutil keeps its start time: a reused pid is not it
        except psutil.NoSuchProcess:
            pass
    stop_trees(started, grace=0)


class Processes:
    """Processes this launcher started, each in its own session, stopped by PID (TERM, then KILL) whatever happens;
    if this process is killed, a watchdog process (own session, reading a pipe from us) kills them."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir, self.env = log_dir, env
        self.started: list[subprocess.Popen] = []
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "watchdog.log", "ab") as log:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", "from simulation.deploy import watch_launcher; watch_launcher()"],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            )
        self.pids = cast(IO[bytes], self.watchdog.stdin)

    def start(self, name: str, command: list[str], cwd: Path = REPO) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd,
                                       start_new_session=True)
        self.started.append(process)
        self.pids.write(f"{process.pid}\n".encode())
        self.pids.flush()
        return process

    def run(self, name: str, command: list[str], timeout: float) -> None:
        """A short command, watched like the others; its output goes to its log."""
        process = self.start(name, command)
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{name} did not finish within {timeout:.0f} s") from None
        if status:
            raise RuntimeError(f"{name} exited with {status}; see {self.log_dir / f'{name}.log'}")

    def stop_all(self) -> None:
        """Stop every started process that still runs, with its descendants, then the watchdog."""
        # (a child that exited after poll() stays a zombie until waited for, so its pid is still its own)
        stop_trees([psutil.Process(p.pid) for p in self.started if p.poll() is None], grace=10)
        for process in self.started:
            process.wait()
        self.pids.close()
        self.watchdog.wait()


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops us like Ctrl-C: every started process is stopped in `finally`


def launcher_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every process we start: Flower's CLI and SuperNodes keep their state in `flwr_home`, no
    `uv sync` reinstalls torch, and the SuperLink/SuperNode find flower-superexec beside this Python."""
    return {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def write_connection(flwr_home: Path, address: str, ca: Path) -> None:
    """FLWR_HOME/config.toml naming one SuperLink connection, CONNECTION, for `flwr supernode register`/`flwr run`."""
    atomic_write_text(flwr_home / "config.toml", f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                                 f'address = "{address}"\nroot-certificates = "{ca.resolve()}"\n')


def superlink_command(host: str, port: int, tls: tuple[Path, Path, Path], database: Path) -> list[str]:
    """flower-superlink on host:port (one HTTPS port for the Fleet and Control APIs), SuperNode authentication on."""
    ca, cert, key = tls
    return [_bin("flower-superlink"), "--host", host, "--port", str(port), "--ssl-ca-certfile", str(ca),
            "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth",
            "--database", str(database), "--disable-runtime-dependency-installation"]


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
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _wait(process: subprocess.Popen, name: str, timeout: float) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{name} did not finish within {timeout:.0f} s") from None


def deploy(run_dir: Path, cfg: RunConfig, counts: UserCounts, node_caches: Path | None = None,
           timeout: float = PHASE_TIMEOUT) -> int:
    """The quick path, all on 127.0.0.1: partition, start everything, run the app, stop everything; returns
    `flwr run`'s exit status."""
    from simulation.cli import partition_users
    from simulation.node_stores import write_partitions

    run_dir = run_dir.resolve()
    deploy_dir = run_dir / "deploy"
    if deploy_dir.exists():
        raise FileExistsError(f"{run_dir} already holds a deployment; use another --run-dir")
    test, train = partition_users(cfg, counts)
    nodes = write_partitions(run_dir, test, train, {})
    ca, cert, key = make_tls(deploy_dir / "tls", ["localhost", "127.0.0.1"])
    port = free_port()
    flwr_home = deploy_dir / "flwr-home"
    write_connection(flwr_home, f"127.0.0.1:{port}", ca)
    processes = Processes(deploy_dir / "logs", launcher_env(flwr_home))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        superlink = processes.start("superlink", superlink_command("127.0.0.1", port, (ca, cert, key),
                                                                   deploy_dir / "superlink.db"))
        _wait_for_port("127.0.0.1", port, 60, superlink)
        for i, node in enumerate(nodes):
            node_dir = deploy_dir / "nodes" / str(i)
            private, public = make_node_keys(node_dir)
            processes.run(f"register-{i}", [_bin("flwr"), "supernode", "register", str(public), CONNECTION], 120)
            processes.start(f"supernode-{i}", supernode_command(f"127.0.0.1:{port}", ca, private, {
                "user-dir": run_dir / "clients" / node["user"],
                "model-cache": (node_caches / str(i)) if node_caches else node_dir / "cache",
                "audit-dir": run_dir / "audit",
            }, free_port()))
        return _wait(processes.start("flwr-run", flwr_run_command(cfg, counts, run_dir)), "flwr run", timeout)
    finally:
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous)


def _log_tail(path: Path, lines: int = 6) -> str:
    text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return "\n    ".join(text[-lines:])


REFUSALS = {  # what Flower's exit message says -> what it means to the person starting the node
    "CERTIFICATE_VERIFY_FAILED": "refused by TLS: the SuperLink's certificate is not signed by --ca-cert, or does "
                                 "not name the host in --superlink",
    "Failed to activate SuperNode": "refused by the SuperLink: this node's public key is not registered "
                                    "(oppu-deploy register ... <dir>/<user>/node_key.pub)",
}


def why_exited(log: Path) -> str:
    """Flower's exit message in a process's log (from its 'Exit Code' line), with what a refusal means; else the
    end of the log."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    start = next((i for i in range(len(lines) - 1, -1, -1) if "Exit Code" in lines[i]), None)
    if start is None:
        return _log_tail(log)
    block = lines[start:start + next((i for i, line in enumerate(lines[start:]) if "For more information" in line),
                                     len(lines) - start)]
    meaning = [text for key, text in REFUSALS.items() if any(key in line for line in block)]
    return "\n    ".join([*meaning, *block])


def _serve(processes: Processes, watched: dict[str, subprocess.Popen]) -> int:
    """Keep long-running processes up until Ctrl-C or SIGTERM (exit 0), or until one of them exits (exit 1, saying
    why); the caller stops every process in `finally`."""
    try:
        while True:
            for name, process in watched.items():
                if process.poll() is not None:
                    log = processes.log_dir / f"{name}.log"
                    print(f"oppu-deploy: {name} exited with {process.returncode} (log: {log}):\n    {why_exited(log)}",
                          file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("oppu-deploy: stopped; every started process was stopped", file=sys.stderr)
        return 0


def serve_superlink(directory: Path, host: str, port: int, names: list[str]) -> int:
    """The coordinator's SuperLink: CA (made once, kept in `directory`), a certificate for `names` and the bind
    address, SuperNode authentication; prints what a joining machine needs and runs until Ctrl-C."""
    directory = directory.resolve()
    if host not in ("0.0.0.0", "::"):
        names = [*names, host]  # Flower's SuperExec (ServerApp) connects to the bind address
    elif not names:
        raise SetupError(f"--host {host} binds every address: give --name with the hostname(s) machines will use")
    else:
        names = [*names, "127.0.0.1" if host == "0.0.0.0" else "::1"]  # where SuperExec connects then
    tls = make_tls(directory / "tls", names, days=365)
    ca = tls[0]
    address = f"{names[0]}:{port}" if ":" not in names[0] else f"[{names[0]}]:{port}"
    flwr_home = directory / "flwr-home"
    write_connection(flwr_home, address, ca)
    processes = Processes(directory / "logs", launcher_env(flwr_home))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        superlink = processes.start("superlink", superlink_command(host, port, tls, directory / "superlink.db"))
        _wait_for_port(host, port, 60, superlink)
        atomic_write_json(directory / "join.json", {"address": address, "ca": str(ca), "names": names})
        print(f"""SuperLink listening on {host}:{port} (HTTPS; certificate names {', '.join(dict.fromkeys(names))}; \
SuperNode authentication on). Log: {processes.log_dir / 'superlink.log'}
A joining machine needs: the CA certificate {ca} (copy it there; it is not secret) and TCP access to {address}.
1. On each device machine, make the node keys:
     oppu-deploy supernode --superlink {address} --ca-cert ca.pem --dir NODES --keys-only USER.json ...
2. Register each public key it prints (here, or wherever ca.pem and {address} are reachable):
     oppu-deploy register --superlink {address} --ca-cert {ca} NODE_KEY.pub ...
3. Start the SuperNodes there: the same supernode command without --keys-only.
4. Start the run here:
     oppu-deploy run --superlink {address} --ca-cert {ca} --num-clients N --train-clients M [method flags]
Stop with Ctrl-C.""", flush=True)
        return _serve(processes, {"superlink": superlink})
    finally:
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous)


def register(superlink: str, ca: Path, keys: list[Path], log_dir: Path) -> int:
    """`flwr supernode register` of each public key with the SuperLink at `superlink`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="oppu-register-") as home:
        write_connection(Path(home), superlink, ca)
        processes = Processes(log_dir, launcher_env(Path(home)))
        try:
            for key in keys:
                name = f"register-{key.parent.name}-{key.stem}"
                processes.run(name, [_bin("flwr"), "supernode", "register", str(key.resolve()), CONNECTION], 120)
                print(f"registered {key}: {_log_tail(log_dir / f'{name}.log', 1)}")
        finally:
            processes.stop_all()
    return 0


@dataclass(frozen=True)
class LocalNode:
    """One SuperNode of a device machine: its user, role and directory (shaped like a run directory of one user, so
    `oppu-audit --side client` reads it): clients/<user>/ store, audit/, node_key(.pub), cache/."""

    user: str
    role: str
    directory: Path

    @property
    def store(self) -> UserStore:
        return UserStore(self.directory, self.user)


def prepare_node(machine_dir: Path, data_file: Path) -> LocalNode:
    """A node directory under `machine_dir` for one user's data file (as `oppu-deploy partition` wrote it): the
    file copied into its store (a store holding other data is refused), its canary listed for its own audit, its
    key pair made once."""
    from client.data import DataError, load_oppu
    from common.tasks import TASKS
    from simulation.node_stores import CANARY

    record = read_json(data_file) if data_file.is_file() else None
    if not isinstance(record, dict) or record.get("role") not in ("test", "train") or record.get("task") not in TASKS:
        raise SetupError(f"{data_file}: expected one user's data file with 'role' test or train and a known 'task' "
                         "(written by `oppu-deploy partition`: <out>/clients/<user>/data.json)")
    try:
        user = load_oppu(data_file, record["task"])[0]
    except DataError as e:
        raise SetupError(str(e)) from e
    node = LocalNode(user.user_id, record["role"], machine_dir / user.user_id)
    data = data_file.read_bytes()
    if node.store.data.exists() and node.store.data.read_bytes() != data:
        raise SetupError(f"{data_file}: {node.store.data} holds other data for user {user.user_id}; use another --dir")
    atomic_write_bytes(node.store.data, data)
    atomic_write_json(node.directory / "audit" / "canaries.json",
                      {user.user_id: c for c in CANARY.findall(data.decode())})
    make_node_keys(node.directory)
    return node


def serve_supernodes(superlink: str, ca: Path, machine_dir: Path, data_files: list[Path], keys_only: bool) -> int:
    """A device machine: one SuperNode per local user file, joining the remote SuperLink; runs until Ctrl-C, or
    until a SuperNode exits (refused: wrong CA, unregistered key; or the SuperLink went away)."""
    machine_dir = machine_dir.resolve()
    nodes = [prepare_node(machine_dir, f) for f in data_files]
    users = [n.user for n in nodes]
    if len(set(users)) < len(users):
        raise SetupError(f"user files: a user appears twice ({', '.join(sorted(u for u in set(users) if users.count(u) > 1))})")
    if keys_only:
        print("public keys to register with the SuperLink (oppu-deploy register --superlink ... --ca-cert ... KEY ...):")
        for node in nodes:
            print(f"  {node.directory / 'node_key.pub'}   ({node.role} user {node.user})")
        return 0
    processes = Processes(machine_dir / "logs", launcher_env(machine_dir / "flwr-home"))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        watched = {}
        for node in nodes:
            watched[f"supernode-{node.user}"] = processes.start(f"supernode-{node.user}", supernode_command(
                superlink, ca.resolve(), node.directory / "node_key",
                {"user-dir": node.store.root, "model-cache": node.directory / "cache",
                 "audit-dir": node.directory / "audit"},
                free_port()), cwd=machine_dir)
        print(f"{len(nodes)} SuperNode(s) joining {superlink}: " + ", ".join(f"{n.user} ({n.role})" for n in nodes)
              + f"; logs: {processes.log_dir}; audit one node with `oppu-audit --side client {machine_dir}/<user>`. "
              "Stop with Ctrl-C.", flush=True)
        return _serve(processes, watched)
    finally:
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous)


def start_run(superlink: str, ca: Path, cfg: RunConfig, counts: UserCounts, run_dir: Path, timeout: float,
              partition: Path | None) -> int:
    """`flwr run` against a remote SuperLink; `partition` (the output of `oppu-deploy partition`) is checked against
    the user counts and lends its canary list to the server-side audit. Returns flwr run's exit status."""
    run_dir = run_dir.resolve()
    if (run_dir / "deploy").exists():
        raise FileExistsError(f"{run_dir} already holds a run; use another --run-dir")
    if partition is not None:
        nodes = read_json(partition / "nodes.json")
        if not isinstance(nodes, list):
            raise SetupError(f"--partition {partition}: no nodes.json there; expected the --out of oppu-deploy partition")
        roles = [n["role"] for n in nodes]
        if (roles.count("test"), roles.count("train")) != (counts.test, counts.training(cfg)):
            raise SetupError(f"--partition {partition} holds {roles.count('test')} test and {roles.count('train')} "
                             f"training users; expected --num-clients {counts.test} and --train-clients "
                             f"{counts.training(cfg)}")
        atomic_write_bytes(run_dir / "audit" / "canaries.json", (partition / "audit" / "canaries.json").read_bytes())
    flwr_home = run_dir / "deploy" / "flwr-home"
    write_connection(flwr_home, superlink, ca)
    processes = Processes(run_dir / "deploy" / "logs", launcher_env(flwr_home))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _wait(processes.start("flwr-run", flwr_run_command(cfg, counts, run_dir)), "flwr run", timeout)
    finally:
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous)


def _address(text: str) -> str:
    """--superlink: HOST:PORT (a hostname, IPv4 or [IPv6] address)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. coordinator.example.org:9092; got {text!r}")
    return text


def _name(text: str) -> str:
    """--name: a hostname or IP address the SuperLink's certificate names."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        if re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", text):
            return text
    raise argparse.ArgumentTypeError(f"expected a hostname or an IP address, got {text!r}")


def _ca_file(text: str) -> Path:
    """--ca-cert: the CA certificate (PEM) the SuperLink's certificate is signed with."""
    path = Path(text)
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(
            f"{text}: not a readable PEM certificate ({e}); expected the ca.pem that `oppu-deploy superlink` printed"
        ) from None
    return path


def _add_join_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", type=_address, required=True,
                        help="the SuperLink as HOST:PORT, by a name its certificate holds (as `oppu-deploy superlink` "
                             "printed)")
    parser.add_argument("--ca-cert", type=_ca_file, required=True,
                        help="the CA certificate the SuperLink's certificate is signed with (its tls/ca.pem)")


PARTITION_FIELDS = ("task", "data", "max_text_chars", "max_user_history", "num_queries", "seed", "rounds")


def build_parser() -> argparse.ArgumentParser:
    """oppu-deploy and its roles (the bare form, without a role, is `local`)."""
    from simulation.cli import add_run_flags

    parser = argparse.ArgumentParser(
        prog="oppu-deploy",
        description="Federated OPPU on real Flower processes (SuperLink, SuperNodes, `flwr run`) with TLS and "
        "SuperNode authentication. `local` (also the bare form: `oppu-deploy --num-clients 2 ...`) runs everything "
        "on 127.0.0.1 of this machine; the other roles split it over machines (docs/deployment.md): a coordinator "
        "runs `superlink` and `run`, device machines run `supernode` with their users' files from `partition`.",
    )
    roles = parser.add_subparsers(dest="role", metavar="ROLE", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    local = roles.add_parser("local", formatter_class=fmt, help="everything on 127.0.0.1 (the quick path)",
                             description="One SuperLink and one SuperNode per user on 127.0.0.1 (TLS, SuperNode "
                             "authentication), run with `flwr run`. Same options as flower-simulation.")
    add_run_flags(local, simulation=False)
    local.add_argument("--node-caches", type=Path, default=None,
                       help="model caches of the SuperNodes (<dir>/<i>), kept across deployments; "
                            "default: empty caches under the run directory, so the base model is sent once")

    superlink = roles.add_parser("superlink", formatter_class=fmt, help="the coordinator's SuperLink",
                                 description=serve_superlink.__doc__)
    superlink.add_argument("--dir", type=Path, required=True,
                           help="the coordinator's deployment directory: tls/ (CA kept across restarts), "
                                "superlink.db (registered keys), logs/, join.json")
    superlink.add_argument("--host", required=True,
                           help="address to bind: one of this machine's addresses, or 0.0.0.0 for all")
    superlink.add_argument("--port", type=int, default=9092, help="the one TCP port machines connect to (HTTPS)")
    superlink.add_argument("--name", type=_name, action="append", default=[],
                           help="a hostname or IP address machines use to reach it (repeat the flag); the "
                                "certificate names these and the bind address; the first is the one printed")

    reg = roles.add_parser("register", formatter_class=fmt, help="register SuperNode public keys",
                           description="Register SuperNode public keys with the SuperLink (`flwr supernode register`); "
                           "a SuperNode whose key is not registered is refused.")
    _add_join_flags(reg)
    reg.add_argument("keys", type=Path, nargs="+", metavar="NODE_KEY.pub",
                     help="public keys, as `oppu-deploy supernode --keys-only` printed")
    reg.add_argument("--log-dir", type=Path, default=Path("register-logs"), help="where flwr's output goes")

    supernode = roles.add_parser("supernode", formatter_class=fmt, help="a device machine's SuperNodes",
                                 description=serve_supernodes.__doc__)
    _add_join_flags(supernode)
    supernode.add_argument("--dir", type=Path, default=Path("."),
                           help="this machine's node directories: <dir>/<user>/ (store, audit, key pair, model cache), "
                                "logs/, flwr-home/")
    supernode.add_argument("--keys-only", action="store_true",
                           help="make the node key pairs and print the public keys to register, start nothing")
    supernode.add_argument("data_files", type=Path, nargs="+", metavar="USER.json",
                           help="this machine's users' data files (clients/<user>/data.json of `oppu-deploy partition`)")

    part = roles.add_parser("partition", formatter_class=fmt, help="each user's data file, to hand out",
                            description="Split a dataset into test and training users as flower-simulation does and "
                            "write one data file per user, with its role: <out>/clients/<user>/data.json (copy it to "
                            "the machine that holds the user), <out>/nodes.json, <out>/audit/canaries.json.")
    part.add_argument("--out", type=Path, required=True, help="a new directory for the files")
    part.add_argument("--num-clients", type=int, default=UserCounts.test, help="test users: the longest histories")
    part.add_argument("--train-clients", type=int, default=UserCounts.train,
                      help="training users (a seeded sample of the others)")
    part.add_argument("--canaries", action="store_true",
                      help="plant a unique marker in every user's history; `oppu-audit` checks none is sent")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name in PARTITION_FIELDS:
        part.add_argument(f"--{name.replace('_', '-')}", type=type(fields[name].default),
                          default=fields[name].default, help=fields[name].metadata["help"])
    part.add_argument("--verbose", action="store_true", help="print a setup error's traceback too")

    run = roles.add_parser("run", formatter_class=fmt, help="start the run against a SuperLink",
                           description="`flwr run` of this project against a remote SuperLink with the run config; "
                           "the ServerApp runs on the SuperLink's host and writes the report and the server's audit "
                           "log into --run-dir there (run this on the coordinator to have them here).")
    _add_join_flags(run)
    run.add_argument("--partition", type=Path, default=None,
                     help="the --out of `oppu-deploy partition`: its user counts are checked against --num-clients "
                          "and --train-clients, and its canary list goes to <run-dir>/audit for the server's audit")
    add_run_flags(run, simulation=False)
    return parser


def _default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.task}"


def _report(prog: str, run_dir: Path, status: int, counts: UserCounts, allow_failed_updates: bool) -> int:
    """Exit status of a finished `flwr run`: its report printed and judged (as flower-simulation does)."""
    from simulation.cli import exit_status

    report = run_dir / "report.json"
    if status != 0 or not report.exists():
        print(f"{prog}: the run failed (flwr run exit {status}, no {report}); logs: {run_dir / 'deploy' / 'logs'}",
              file=sys.stderr)
        return 1
    print((run_dir / "report.md").read_text())
    return exit_status(prog, json.loads(report.read_text()), counts, allow_failed_updates)


def main(argv: list[str] | None = None) -> int:
    from simulation.cli import (
        INTERRUPTED,
        SetupError,
        check_run_flags,
        run_config_of,
        setup_failure,
        user_counts,
    )

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in ROLES and argv[0] not in ("-h", "--help")):
        argv = ["local", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = "oppu-deploy" if args.role == "local" else f"oppu-deploy {args.role}"  # the quick path speaks as before
    try:
        if args.role == "superlink":
            return serve_superlink(args.dir, args.host, args.port, args.name)
        if args.role == "register":
            return register(args.superlink, args.ca_cert, args.keys, args.log_dir)
        if args.role == "supernode":
            return serve_supernodes(args.superlink, args.ca_cert, args.dir, args.data_files, args.keys_only)
        if args.role == "partition":
            return partition(args)
        cfg = run_config_of(args, parser)
        check_run_flags(args, cfg)
        counts = user_counts(args)
        run_dir = args.run_dir or _default_run_dir(cfg)
        if args.role == "local":
            status = deploy(run_dir, cfg, counts, args.node_caches, args.timeout)
        else:
            status = start_run(args.superlink, args.ca_cert, cfg, counts, run_dir, args.timeout, args.partition)
        return _report(prog, run_dir.resolve(), status, counts, args.allow_failed_updates)
    except SetupError as e:  # bad flags or data, found before any process starts
        return setup_failure(prog, e, getattr(args, "verbose", False))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; every started process was stopped", file=sys.stderr)
        return INTERRUPTED
    except (FileExistsError, ValueError, RuntimeError, TimeoutError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1


ROLES = ("local", "superlink", "register", "supernode", "partition", "run")


def partition(args: argparse.Namespace) -> int:
    """`oppu-deploy partition`: the users' data files, one per user, with their roles."""
    from simulation.cli import SetupError, partition_users, user_counts
    from simulation.node_stores import plant_canaries, write_partitions

    if (args.out / "nodes.json").exists():
        raise FileExistsError(f"--out {args.out}: already holds a partition; use another directory")
    try:
        cfg = RunConfig(**{name: getattr(args, name) for name in PARTITION_FIELDS})
    except ValueError as e:
        raise SetupError(str(e)) from e
    test, train = partition_users(cfg, user_counts(args))
    nodes = write_partitions(args.out, test, train, plant_canaries(test + train) if args.canaries else {})
    for node in nodes:
        print(f"{node['role']:5s} {node['user']}: {UserStore(args.out, node['user']).data}")
    print(f"{len(nodes)} user files in {args.out / 'clients'}; copy each to the machine that holds the user")
    return 0


if __name__ == "__main__":
    sys.exit(main())
