"""`oppu-deploy`'s command line: the roles' flags, and `main` (dispatch, exit status).

`local` (also the bare form) is the quick path: one SuperLink and N SuperNodes on 127.0.0.1 with TLS and SuperNode
authentication, then `flwr run`. The other roles split the same over machines (docs/deployment.md): `superlink` on
a coordinator (CA made once and kept, a certificate for the names machines use), `partition` (one data file per
user), `supernode` on each device machine (one SuperNode per local user file), `register` (node public keys), `run`
(`flwr run` against the SuperLink).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import re
import sys
import time
from pathlib import Path

from cryptography import x509

from common.config import RUN_KEYS, RunConfig, UserCounts
from common.exit_status import FAILED, INTERRUPTED
from simulation.deploy.diagnosis import why_exited
from simulation.deploy.roles import (
    FLWR_RUN,
    PARTITION_FIELDS,
    deploy,
    partition,
    register,
    serve_superlink,
    serve_supernodes,
    start_run,
)
from simulation.errors import SetupError
from simulation.flags import (
    DefaultsHelpFormatter, add_run_flags, check_run_flags, run_config_of, train_clients, user_counts,
)
from simulation.outcome import exit_status, setup_failure

ROLES = ("local", "superlink", "register", "supernode", "partition", "run")


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
    """The flags of every role that reaches a remote SuperLink: its address and the CA that signed its certificate."""
    parser.add_argument("--superlink", type=_address, required=True,
                        help="the SuperLink as HOST:PORT, by a name its certificate holds (as `oppu-deploy superlink` "
                             "printed)")
    parser.add_argument("--ca-cert", type=_ca_file, required=True,
                        help="the CA certificate the SuperLink's certificate is signed with (its tls/ca.pem)")


def build_parser() -> argparse.ArgumentParser:
    """oppu-deploy and its roles (the bare form, without a role, is `local`)."""
    parser = argparse.ArgumentParser(
        prog="oppu-deploy",
        description="Federated OPPU on real Flower processes (SuperLink, SuperNodes, `flwr run`) with TLS and "
        "SuperNode authentication. `local` (also the bare form: `oppu-deploy --num-clients 2 ...`) runs everything "
        "on 127.0.0.1 of this machine; the other roles split it over machines (docs/deployment.md): a coordinator "
        "runs `superlink` and `run`, device machines run `supernode` with their users' files from `partition`.",
    )
    roles = parser.add_subparsers(dest="role", metavar="ROLE", required=True)
    fmt = DefaultsHelpFormatter

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
    part.add_argument("--train-clients", type=train_clients, default=RUN_KEYS["train-clients"],
                      help="training users (a seeded sample of the others, or 'all' of them)")
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
    """Without --run-dir: a new runs/deploy-<time>-<task>."""
    return Path("runs") / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.task}"


def _report(prog: str, run_dir: Path, status: int, counts: UserCounts, allow_failed_updates: bool) -> int:
    """Exit status of a finished `flwr run`: its report printed and judged (as flower-simulation does)."""
    report = run_dir / "report.json"
    if status != 0 or not report.exists():
        logs = run_dir / "deploy" / "logs"
        why = why_exited(logs / f"{FLWR_RUN}.log")
        print(f"{prog}: the run failed (flwr run exit {status}, no {report}); logs: {logs}"
              + (f"; flwr run said:\n    {why}" if why else ""), file=sys.stderr)
        return FAILED
    print((run_dir / "report.md").read_text())
    return exit_status(prog, json.loads(report.read_text()), counts, allow_failed_updates)


def _run_role(args: argparse.Namespace, parser: argparse.ArgumentParser, prog: str) -> int:
    """The role's exit status; a role that runs the app (`local`, `run`) is judged by its report."""
    if args.role == "superlink":
        return serve_superlink(args.dir, args.host, args.port, args.name)
    if args.role == "register":
        return register(args.superlink, args.ca_cert, args.keys, args.log_dir)
    if args.role == "supernode":
        return serve_supernodes(args.superlink, args.ca_cert, args.dir, args.data_files, args.keys_only)
    if args.role == "partition":
        return partition(args)
    cfg = run_config_of(args, parser)
    check_run_flags(args, cfg, clients_here=args.role == "local")
    counts = user_counts(args)
    run_dir = args.run_dir or _default_run_dir(cfg)
    if args.role == "local":
        status = deploy(run_dir, cfg, counts, args.node_caches, args.timeout)
    else:
        status = start_run(args.superlink, args.ca_cert, cfg, counts, run_dir, args.timeout, args.partition)
    return _report(prog, run_dir.resolve(), status, counts, args.allow_failed_updates)


def main(argv: list[str] | None = None) -> int:
    """`oppu-deploy [ROLE] ...`, exiting by the commands' rule (common/exit_status.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in ROLES and argv[0] not in ("-h", "--help")):
        argv = ["local", *argv]  # the bare form is `local`
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = "oppu-deploy" if args.role == "local" else f"oppu-deploy {args.role}"  # the quick path speaks as before
    try:
        return _run_role(args, parser, prog)
    except SetupError as e:  # bad flags or data, found before any process starts
        return setup_failure(prog, e, getattr(args, "verbose", False))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; every started process was stopped", file=sys.stderr)
        return INTERRUPTED
    except (RuntimeError, TimeoutError) as e:  # a Flower process that failed or did not answer in time
        print(f"{prog}: {e}", file=sys.stderr)
        return FAILED
