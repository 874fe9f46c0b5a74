"""The roles of oppu-deploy: `local` (everything on 127.0.0.1 of this machine) and the roles that split it over
machines (docs/deployment.md): `superlink`, `register`, `supernode`, `run`, `partition`.

Layout of the quick path (`local`), under the run directory:
    deploy/tls/                 ca.pem, ca.key, superlink.pem, superlink.key
    deploy/nodes/<i>/           node key pair, model cache
    deploy/flwr-home/           FLWR_HOME for the CLI (connection "oppu")
    deploy/logs/                superlink.log, register-<i>.log, supernode-<i>.log, flwr-run.log, watchdog.log
    clients/<user>/             node-local stores, as in the simulation; audit/ both sides' logs
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from client.data import DataError, load_oppu
from common.config import PHASE_TIMEOUT, RunConfig, UserCounts
from common.exit_status import DONE
from common.store import UserStore, atomic_write_bytes, atomic_write_json, read_json
from common.tasks import TASKS
from simulation.deploy.commands import (
    flwr_run_command,
    launcher_env,
    register_command,
    superlink_command,
    supernode_command,
    write_connection,
)
from simulation.deploy.diagnosis import log_tail
from simulation.deploy.keys import make_node_keys, make_tls
from simulation.deploy.processes import Processes, free_ports, wait_for_exit, wait_for_port
from simulation.errors import SetupError
from simulation.flags import user_counts
from simulation.node_stores import CANARY, partition_users, plant_canaries, write_partitions

PARTITION_FIELDS = ("task", "data", "max_text_chars", "max_user_history", "num_queries", "seed", "rounds")
FLWR_RUN = "flwr-run"  # the `flwr run` process; its output: deploy/logs/flwr-run.log


def deploy(run_dir: Path, cfg: RunConfig, counts: UserCounts, node_caches: Path | None = None,
           timeout: float = PHASE_TIMEOUT) -> int:
    """The quick path, all on 127.0.0.1: partition, start everything, run the app, stop everything; returns
    `flwr run`'s exit status."""
    run_dir = run_dir.resolve()
    deploy_dir = run_dir / "deploy"
    if deploy_dir.exists():
        raise SetupError(f"--run-dir {run_dir}: already holds a deployment; use another --run-dir")
    test, train = partition_users(cfg, counts)
    nodes = write_partitions(run_dir, test, train, {})
    counts = UserCounts(len(test), len(train))  # (--train-clients all: the federation's node count, now known)
    ca, cert, key = make_tls(deploy_dir / "tls", ["localhost", "127.0.0.1"])
    port, *node_ports = free_ports(1 + len(nodes))
    flwr_home = deploy_dir / "flwr-home"
    write_connection(flwr_home, f"127.0.0.1:{port}", ca)
    with Processes(deploy_dir / "logs", launcher_env(flwr_home)) as processes:
        superlink = processes.start("superlink", superlink_command("127.0.0.1", port, (ca, cert, key),
                                                                   deploy_dir / "superlink.db"))
        wait_for_port("127.0.0.1", port, 60, superlink)
        for i, (node, node_port) in enumerate(zip(nodes, node_ports)):
            node_dir = deploy_dir / "nodes" / str(i)
            private, public = make_node_keys(node_dir)
            processes.run(f"register-{i}", register_command(public), 120)
            processes.start(f"supernode-{i}", supernode_command(f"127.0.0.1:{port}", ca, private, {
                "user-dir": run_dir / "clients" / node["user"],
                "model-cache": (node_caches / str(i)) if node_caches else node_dir / "cache",
                "audit-dir": run_dir / "audit",
            }, node_port))
        return wait_for_exit(processes.start(FLWR_RUN, flwr_run_command(cfg, counts, run_dir)), "flwr run", timeout)


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
    with Processes(directory / "logs", launcher_env(flwr_home)) as processes:
        superlink = processes.start("superlink", superlink_command(host, port, tls, directory / "superlink.db"))
        wait_for_port(host, port, 60, superlink)
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
        return processes.serve({"superlink": superlink})


def register(superlink: str, ca: Path, keys: list[Path], log_dir: Path) -> int:
    """`flwr supernode register` of each public key with the SuperLink at `superlink`."""
    with tempfile.TemporaryDirectory(prefix="oppu-register-") as home:
        write_connection(Path(home), superlink, ca)
        with Processes(log_dir, launcher_env(Path(home))) as processes:
            for key in keys:
                name = f"register-{key.parent.name}-{key.stem}"
                processes.run(name, register_command(key.resolve()), 120)
                print(f"registered {key}: {log_tail(log_dir / f'{name}.log', 1)}")
    return DONE


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
        return DONE
    with Processes(machine_dir / "logs", launcher_env(machine_dir / "flwr-home")) as processes:
        watched = {}
        for node, node_port in zip(nodes, free_ports(len(nodes))):
            watched[f"supernode-{node.user}"] = processes.start(f"supernode-{node.user}", supernode_command(
                superlink, ca.resolve(), node.directory / "node_key",
                {"user-dir": node.store.root, "model-cache": node.directory / "cache",
                 "audit-dir": node.directory / "audit"},
                node_port), cwd=machine_dir)
        print(f"{len(nodes)} SuperNode(s) joining {superlink}: " + ", ".join(f"{n.user} ({n.role})" for n in nodes)
              + f"; logs: {processes.log_dir}; audit one node with `oppu-audit --side client {machine_dir}/<user>`. "
              "Stop with Ctrl-C.", flush=True)
        return processes.serve(watched)


def start_run(superlink: str, ca: Path, cfg: RunConfig, counts: UserCounts, run_dir: Path, timeout: float,
              partition: Path | None) -> int:
    """`flwr run` against a remote SuperLink; `partition` (the output of `oppu-deploy partition`) is checked against
    the user counts and lends its canary list to the server-side audit. Returns flwr run's exit status."""
    run_dir = run_dir.resolve()
    if (run_dir / "deploy").exists():
        raise SetupError(f"--run-dir {run_dir}: already holds a run; use another --run-dir")
    if counts.train is None:
        raise SetupError("--train-clients all: give the number of training users, as the SuperNodes started for them")
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
    with Processes(run_dir / "deploy" / "logs", launcher_env(flwr_home)) as processes:
        return wait_for_exit(processes.start(FLWR_RUN, flwr_run_command(cfg, counts, run_dir)), "flwr run", timeout)


def partition(args: argparse.Namespace) -> int:
    """`oppu-deploy partition`: the users' data files, one per user, with their roles."""
    if (args.out / "nodes.json").exists():
        raise SetupError(f"--out {args.out}: already holds a partition; use another directory")
    try:
        cfg = RunConfig(**{name: getattr(args, name) for name in PARTITION_FIELDS})
    except ValueError as e:
        raise SetupError(str(e)) from e
    test, train = partition_users(cfg, user_counts(args))
    nodes = write_partitions(args.out, test, train, plant_canaries(test + train) if args.canaries else {})
    for node in nodes:
        print(f"{node['role']:5s} {node['user']}: {UserStore(args.out, node['user']).data}")
    print(f"{len(nodes)} user files in {args.out / 'clients'}; copy each to the machine that holds the user")
    return DONE
