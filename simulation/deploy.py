"""`oppu-deploy`: one SuperLink and N SuperNodes as real processes on 127.0.0.1, then `flwr run` against them.

TLS certificates (a local CA and a certificate for 127.0.0.1) and SuperNode authentication keys are made
here; each SuperNode is registered with the SuperLink and started with its own node-local store, model
cache and audit directory. Every process started is stopped by PID, with every process below it, at the end, on
failure and on Ctrl-C; if oppu-deploy itself is killed (even by SIGKILL), a watchdog process kills them.

Layout under the run directory:
    deploy/tls/                 ca.pem, superlink.pem, superlink.key
    deploy/nodes/<i>/           node key pair, model cache, audit log
    deploy/flwr-home/           FLWR_HOME for the CLI (connection "oppu-local")
    deploy/logs/                superlink.log, register-<i>.log, supernode-<i>.log, flwr-run.log, watchdog.log
    clients/<user>/             node-local stores, as in the simulation
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, cast

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.config import RunConfig, UserCounts

CONNECTION = "oppu-local"
REPO = Path(__file__).resolve().parents[1]


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A local CA and a SuperLink certificate for 127.0.0.1/localhost: (ca.pem, superlink.pem, superlink.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "OPPU-FL local CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "superlink.pem", directory / "superlink.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths[2], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def make_node_keys(directory: Path) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format, as SuperNode authentication expects: (private, public)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / "node_key", directory / "node_key.pub"
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited with {process.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


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

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
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


def deploy(run_dir: Path, cfg: RunConfig, counts: UserCounts, node_caches: Path | None = None,
           timeout: float = 6 * 3600) -> int:
    """Start everything, run the app, stop everything; returns `flwr run`'s exit status."""
    from simulation.cli import partition_users
    from simulation.node_stores import write_partitions

    run_dir = run_dir.resolve()
    deploy_dir = run_dir / "deploy"
    if deploy_dir.exists():
        raise FileExistsError(f"{run_dir} already holds a deployment; use another --run-dir")
    test, train = partition_users(cfg, counts)
    nodes = write_partitions(run_dir, test, train, {})
    ca, cert, key = make_tls(deploy_dir / "tls")
    port = free_port()
    flwr_home = deploy_dir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n'
    )
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # flower-superexec
    processes = Processes(deploy_dir / "logs", env)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        superlink = processes.start("superlink", [
            _bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(port), "--ssl-ca-certfile", str(ca),
            "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth",
            "--database", str(deploy_dir / "superlink.db"), "--disable-runtime-dependency-installation",
        ])
        _wait_for_port(port, 60, superlink)
        for i, node in enumerate(nodes):
            node_dir = deploy_dir / "nodes" / str(i)
            private, public = make_node_keys(node_dir)
            processes.run(f"register-{i}", [_bin("flwr"), "supernode", "register", str(public), CONNECTION], 120)
            cache = (node_caches / str(i)) if node_caches else node_dir / "cache"
            node_config = (f"user-dir='{run_dir / 'clients' / node['user']}' model-cache='{cache}' "
                           f"audit-dir='{run_dir / 'audit'}'")
            processes.start(f"supernode-{i}", [
                _bin("flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(ca),
                "--auth-supernode-private-key", str(private), "--auth-supernode-public-key", str(public),
                "--node-config", node_config, "--port", str(free_port()),
            ])
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in {
            **cfg.to_record(), "num-clients": counts.test, "train-clients": counts.train, "run-dir": str(run_dir),
        }.items())
        runner = processes.start("flwr-run", [_bin("flwr"), "run", ".", CONNECTION, "--stream",
                                              "--run-config", overrides])
        return runner.wait(timeout)
    finally:
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous)


def _toml(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def main(argv: list[str] | None = None) -> int:
    from simulation.cli import (
        SetupError,
        build_parser,
        check_run_flags,
        exit_status,
        run_config_of,
        setup_failure,
        user_counts,
    )

    parser = build_parser(simulation=False)
    parser.prog = "oppu-deploy"
    parser.description = ("Federated OPPU on real processes: one SuperLink and one SuperNode per user on 127.0.0.1 "
                          "(TLS, SuperNode authentication), run with `flwr run`. Same options as flower-simulation.")
    parser.add_argument("--node-caches", type=Path, default=None,
                        help="model caches of the SuperNodes (<dir>/<i>), kept across deployments; "
                             "default: empty caches under the run directory, so the base model is sent once")
    args = parser.parse_args(argv)
    cfg = run_config_of(args, parser)
    try:
        check_run_flags(args, cfg)
        counts = user_counts(args)
    except SetupError as e:
        return setup_failure(parser.prog, e, args.verbose)
    run_dir = args.run_dir or Path("runs") / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.task}"
    try:
        status = deploy(run_dir, cfg, counts, args.node_caches, args.timeout)
    except SetupError as e:  # bad data, found before any process starts
        return setup_failure(parser.prog, e, args.verbose)
    except KeyboardInterrupt:
        print("oppu-deploy: interrupted; every started process was stopped", file=sys.stderr)
        return 130
    except (FileExistsError, ValueError, RuntimeError, TimeoutError) as e:
        print(f"oppu-deploy: {e} (logs: {run_dir / 'deploy' / 'logs'})", file=sys.stderr)
        return 1
    report = run_dir / "report.json"
    if status != 0 or not report.exists():
        print(f"oppu-deploy: the run failed (flwr run exit {status}); logs: {run_dir / 'deploy' / 'logs'}",
              file=sys.stderr)
        return 1
    print((run_dir / "report.md").read_text())
    return exit_status(parser.prog, json.loads(report.read_text()), counts, args.allow_failed_updates)


if __name__ == "__main__":
    sys.exit(main())
