"""`flower-simulation`: the whole federated OPPU run on Flower's simulation engine (Ray backend).

Flower removed its own `flower-simulation` command; this one wraps `flwr.simulation.run_simulation`.
It prepares one node-local store per user, runs the ServerApp and ClientApp, prints the summary table
and exits non-zero if any test user could not be evaluated or a training user's update failed (Flower itself
exits 0 after failed rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from flwr.clientapp import ClientApp

from client.data import DataError, User
from client.model_build import UnknownModelError, linear_module_names, resolve_model
from client.quantize import quantization_problem
from common.config import PHASE_TIMEOUT, RunConfig, UserCounts
from common.store import JsonFileError, load_json_file
from simulation.console import run_log, setup_console
from simulation.errors import SetupError

log = logging.getLogger("oppu")
ClientAppFactory = Callable[[Path], ClientApp]  # run directory -> the ClientApp its simulated nodes run

RUNS_DIR = Path("runs")
RUN_LOCK = "run.lock"  # in the run directory, held by the process that runs it
INTERRUPTED = 130  # exit status of a run stopped by Ctrl-C (128 + SIGINT)
# Flower passes client_resources on as Ray actor options: a worker process that dies (killed, out of memory) is
# restarted, and the message it was running is run once more on its replacement (a message that kills every
# worker it runs on then fails alone). Retries cover system failures only: an exception in our code is not retried.
WORKER_FAULT_TOLERANCE = {"max_restarts": -1, "max_task_retries": 1}
# A local Ray cluster's address: loopback, so its traffic never leaves the machine (Ray replaces 127.0.0.1 itself by
# the machine's network address, not 127.0.0.2)
LOCAL_RAY_ADDRESS = "127.0.0.2"


def gpu_share(text: str) -> str | float:
    """--gpus-per-client: 'auto' or a share >= 0."""
    if text == "auto":
        return text
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not (math.isfinite(share) and share >= 0):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {text!r}")
    return share


def client_resources(cpus_per_client: float, gpus_per_client: str | float, device: str, gpus: int, cpus: int) -> dict:
    """Ray resources of one simulated client.

    Ray hides every GPU from an actor that asks for none, so clients told to use CUDA (or 'auto' on a GPU
    host) need a share; 'auto' splits the visible GPUs evenly among the clients that run at once.
    """
    if gpus_per_client == "auto":
        concurrent = max(1, int(cpus // cpus_per_client))
        share = min(1.0, gpus / concurrent) if device != "cpu" and gpus else 0.0
    else:
        share = float(gpus_per_client)
    if device.startswith("cuda") and not share:
        raise SetupError(
            f"--device {device} needs a GPU, but none is visible" if not gpus
            else f"--device {device} with --gpus-per-client 0: Ray would hide the GPU from every client"
        )
    return {"num_cpus": cpus_per_client, "num_gpus": math.floor(share * 1e4) / 1e4}  # Ray counts in 1e-4 units


def build_parser(simulation: bool = True) -> argparse.ArgumentParser:
    """Flags: the run's own plus one per RunConfig field, with its help text and default.

    `simulation=False` leaves out what only the simulation engine has (resume, Ray resources).
    """
    parser = argparse.ArgumentParser(
        prog="flower-simulation",
        description="Federated OPPU (One PEFT Per User) on Flower's simulation engine: every user is one node; "
        "task adaptation by FedAvg over training users, then each test user trains private adapters "
        "on-device and sends back metric statistics only.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_flags(parser, simulation)
    return parser


def add_run_flags(
    parser: argparse.ArgumentParser, simulation: bool = True, one_run: bool = True, fixed: frozenset[str] = frozenset()
) -> None:
    """Add the run flags to `parser` (also a study's subcommand).

    `one_run=False` leaves out --run-dir and --resume (a study names and resumes its runs itself);
    `fixed` names RunConfig fields a study sets per run, so they are no flags there.
    """
    run = parser.add_argument_group("run")
    run.add_argument("--num-clients", type=int, default=UserCounts.test, help="test users (one node each): the longest histories")
    run.add_argument("--train-clients", type=int, default=UserCounts.train,
                     help="training-user nodes for task adaptation (a seeded sample of the other users)")
    if one_run:
        run.add_argument("--run-dir", type=Path, default=None,
                         help="where everything is written (default: runs/<time>-<task>; with --resume: the latest run)")
    if simulation:
        if one_run:
            run.add_argument("--resume", action="store_true",
                             help="continue an interrupted run: finished users are skipped")
            run.add_argument("--task-adapter-from", type=Path, default=None, metavar="RUN_DIR",
                             help="reuse the task adapter of this earlier run instead of training one: its "
                             "task-adaptation settings and user counts must be this run's (only personalization "
                             "and evaluation settings may differ, e.g. --personal-lr, --max-history, --split)")
        run.add_argument("--cache-dir", type=Path, default=None,
                         help="model cache (default: $OPPU_CACHE_DIR or ~/.cache/oppu-fl)")
        run.add_argument("--cpus-per-client", type=float, default=1.0, help="CPU cores per simulated client (Ray)")
        run.add_argument("--gpus-per-client", type=gpu_share, default="auto",
                         help="GPU share per simulated client (Ray): a number, or 'auto': the visible GPUs shared "
                         "evenly by the clients that run at once (--device auto or cuda; 0 without a GPU)")
        run.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                         help="join this existing Ray cluster (`ray start --head` printed it) instead of starting Ray "
                         "here; every machine must see --run-dir (and --cache-dir) at the same path, checked first")
        run.add_argument("--canaries", action="store_true",
                         help="plant a unique marker string in every user's history; `oppu-audit` checks none is sent")
    run.add_argument("--timeout", type=float, default=PHASE_TIMEOUT, help="seconds to wait for a phase's replies")
    run.add_argument("--allow-failed-updates", action="store_true",
                     help="exit 0 even if some training users' task-adaptation updates failed (the report counts "
                     "them; the task adapter averages the others)")
    run.add_argument("--verbose", action="store_true",
                     help="show every library's log lines and warnings on the console (by default they go to "
                          "<run-dir>/logs/console.log) and a setup error's traceback")
    method = parser.add_argument_group("method (also [tool.flwr.app.config] keys for `flwr run`)")
    for f in dataclasses.fields(RunConfig):
        if f.name in fixed:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):  # a switch, off by default
            method.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            method.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])


def check_run_flags(args: argparse.Namespace, cfg: RunConfig, run_dir: Path | None = None) -> None:
    """What RunConfig cannot judge alone, checked before the run writes anything or any process starts; the base
    model is resolved here (built into the model cache on first use, as the server would), so an unknown --model
    stops the run before Ray does."""
    counts = user_counts(args)
    per_round = max(1, round(counts.training(cfg) * cfg.fraction_train))
    if cfg.secure_aggregation and cfg.rounds and per_round < 2:
        raise SetupError(f"--secure-aggregation: SecAgg+ needs 2 or more training users per round, got {per_round} "
                         "(--train-clients times --fraction-train)")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise SetupError(f"--timeout {args.timeout}: expected a finite number of seconds > 0")
    _check_directory_flag("--run-dir", run_dir or getattr(args, "run_dir", None) or RUNS_DIR,
                          "a directory (new, or an earlier run with --resume)")
    for flag, expected in (("cache_dir", "a directory for the model cache"),
                           ("node_caches", "a directory for the nodes' model caches")):
        if getattr(args, flag, None):
            _check_directory_flag(f"--{flag.replace('_', '-')}", getattr(args, flag), expected)
    quantization = quantization_problem(cfg.quantize, cfg.device)
    if quantization:
        raise SetupError(quantization)
    modules = linear_module_names(cfg.model, getattr(args, "cache_dir", None))
    if modules is not None:
        unknown = [t for t in cfg.peft_settings().target_modules if t not in modules]
        if unknown:
            raise SetupError(f"--lora-targets {cfg.lora_targets}: {', '.join(unknown)} names no linear layer of "
                             f"--model {cfg.model}; expected names from {', '.join(modules)}")
    try:
        resolve_model(cfg.model, getattr(args, "cache_dir", None))
    except (UnknownModelError, FileNotFoundError) as e:  # (FileNotFoundError: the default model's package is missing)
        raise SetupError(str(e)) from e


def user_counts(args: argparse.Namespace) -> UserCounts:
    """--num-clients and --train-clients; a bad count is a SetupError."""
    try:
        return UserCounts(args.num_clients, args.train_clients)
    except ValueError as e:
        raise SetupError(str(e)) from e


@dataclass(frozen=True)
class SimulationOptions:
    """Where and how one simulated run happens, beside what defines it (RunConfig, UserCounts)."""

    run_dir: Path | None = None  # None: a new runs/<time>-<task>
    resume: bool = False
    task_adapter_from: Path | None = None  # an earlier run whose task adapter this one reuses
    cache_dir: Path | None = None
    cpus_per_client: float = 1.0
    gpus_per_client: str | float = "auto"
    canaries: bool = False
    timeout: float = PHASE_TIMEOUT
    verbose: bool = False  # the workers' output on the console too
    ray_address: str | None = None  # None: Ray starts on this machine

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimulationOptions:
        """The options among parsed flags (a study's subcommand has no --run-dir or --resume: defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def partition_users(cfg: RunConfig, counts: UserCounts) -> tuple[list[User], list[User]]:
    """(test users, training users) of the configured data; bad data, or too few users, is a SetupError."""
    from client.partition import load_users, split_users

    try:
        return split_users(load_users(cfg, counts.test + counts.train), counts, cfg)
    except DataError as e:
        raise SetupError(f"--data: {e}") from e
    except ValueError as e:
        raise SetupError(str(e)) from e


def _check_directory_flag(flag: str, path: Path, expected: str) -> None:
    """A directory flag's value must be a directory this user may write, or one that can be made."""
    if path.exists() and not path.is_dir():
        raise SetupError(f"{flag} {path}: is a file; expected {expected}")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise SetupError(f"{flag} {path}: {existing} is a file; expected a directory above it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SetupError(f"{flag} {path}: {existing} is not writable; expected a directory this user may write")


def stop_now(prog: str, run_dir: Path | None) -> NoReturn:
    """Ctrl-C: Flower's engine has already stopped its workers, but its ServerApp thread would wait out the reply
    timeout for answers that will not come, and Python waits for that thread before it exits. So Ray is shut down
    and the process ends at once with 130 (128 + SIGINT, as shells report it); every finished user's result is
    already on disk (atomic writes), and --resume continues from there."""
    import ray

    where = f" --run-dir {run_dir}" if run_dir else ""
    print(f"{prog}: interrupted; finished users are kept: run again with --resume{where} to continue",
          file=sys.stderr, flush=True)
    if ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    os._exit(INTERRUPTED)


def setup_failure(prog: str, error: SetupError, verbose: bool) -> int:
    """Exit status 2 with one line saying what to fix; the traceback only with --verbose."""
    if verbose:
        traceback.print_exception(error)
    print(f"{prog}: {error}", file=sys.stderr)
    return 2


def run_failures(report: dict, counts: UserCounts, allow_failed_updates: bool) -> list[str]:
    """Why a finished run is not a complete one: test users not evaluated, and (without --allow-failed-updates)
    training users' updates missing from the task adapter. Flower itself exits 0 after failed rounds."""
    users, failures = report["users"], []
    if users["failed"] or users["evaluated"] < counts.test:
        failures.append(f"{users['failed']} test user(s) failed, {users['evaluated']} of {counts.test} "
                        "evaluated:\n  " + "\n  ".join(report["errors"][:10]))
    failed_updates = sum(report["task_adaptation"]["failed_updates"].values())
    if failed_updates and not allow_failed_updates:
        failures.append(f"{failed_updates} training-user update(s) failed, so the task adapter lacks them (see the "
                        "log above); pass --allow-failed-updates to accept it, or run again in a new --run-dir "
                        "(--resume keeps this task adapter)")
    return failures


def exit_status(prog: str, report: dict, counts: UserCounts, allow_failed_updates: bool) -> int:
    """1 if the run is not complete (saying why on stderr), else 0."""
    failures = run_failures(report, counts, allow_failed_updates)
    for failure in failures:
        print(f"{prog}: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _latest_run() -> Path | None:
    runs = sorted(p for p in RUNS_DIR.glob("*") if (p / "run.json").exists()) if RUNS_DIR.is_dir() else []
    return runs[-1] if runs else None


def prepare_run_dir(cfg: RunConfig, counts: UserCounts, options: SimulationOptions) -> Path:
    """The run directory: new, or (with --resume) an earlier one whose settings match; a SetupError otherwise."""
    settings = run_settings(cfg, counts)
    if options.resume:
        run_dir = options.run_dir or _latest_run()
        if run_dir is None or not (run_dir / "run.json").exists():
            raise SetupError(f"--resume: no earlier run found in {options.run_dir or RUNS_DIR}")
        if read_run_state(run_dir / "run.json") != settings:
            raise SetupError(f"--resume: {run_dir} was run with other settings ({run_dir / 'run.json'})")
        return run_dir
    run_dir = options.run_dir or RUNS_DIR / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.task}"
    if (run_dir / "run.json").exists():
        raise SetupError(f"--run-dir {run_dir}: already holds a run; pass --resume or another --run-dir")
    return run_dir


def read_run_state(path: Path) -> Any:
    """A file of the run directory that --resume needs as it is (run.json, nodes.json); damaged: a SetupError."""
    try:
        return load_json_file(path)
    except JsonFileError as e:
        raise SetupError(f"{e}; the run there cannot be resumed: start it again in another directory") from e


@contextlib.contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for this process while it runs: a second run on it is refused with the holder's pid. The
    lock (flock on run.lock) ends with the process, so a killed run leaves none that blocks its --resume. A run
    directory made here and left with nothing but the lock (the run was refused before it wrote anything) goes."""
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(run_dir / RUN_LOCK, "a+") as lock:
            _lock_for_this_process(lock, run_dir)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    finally:
        if made and [p.name for p in run_dir.iterdir()] == [RUN_LOCK]:
            shutil.rmtree(run_dir)


def _lock_for_this_process(lock: Any, run_dir: Path) -> None:
    """Take the run directory's lock and write this process's pid into it; a SetupError naming the holder's pid."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        raise SetupError(f"--run-dir {run_dir}: in use by another run (pid {holder}); wait for it to end, "
                         "or pick another --run-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()


def copy_task_adapter(source: Path, run_dir: Path, cfg: RunConfig, counts: UserCounts, canaries: bool) -> None:
    """Copy `source`'s task adapter into `run_dir/server/`, where the server reuses it; a SetupError (nothing
    written) unless `source` made it under this run's task-adaptation settings, users and no canaries."""
    from common.store import atomic_directory, atomic_write_json, read_json

    flag = f"--task-adapter-from {source}"
    try:
        earlier, saved = read_json(source / "run.json"), read_json(source / "server" / "task_adapter.json")
        planted = read_json(source / "audit" / "canaries.json")
    except JsonFileError as e:
        raise SetupError(f"{flag}: {e}") from e
    if earlier is None or saved is None:
        raise SetupError(f"{flag}: expected a run directory whose task adaptation finished "
                         "(run.json and server/task_adapter.json)")
    theirs = RunConfig.from_record(earlier["config"]).task_adaptation_settings()
    ours = cfg.task_adaptation_settings()
    differ = [f"{key} {theirs.get(key)!r} there, {value!r} here" for key, value in ours.items() if theirs.get(key) != value]
    differ += [f"{key} {earlier[key]} there, {ours_count} here" for key, ours_count in
               (("num_clients", counts.test), ("train_clients", counts.train)) if earlier[key] != ours_count]
    if canaries or planted:
        differ.append("canaries (planted strings are drawn per run)")
    if differ:
        raise SetupError(f"{flag}: its task adapter was made under other task-adaptation settings: "
                         + "; ".join(differ))
    target = run_dir / "server" / "task_adapter"
    with atomic_directory(target, replace=True) as staging:
        shutil.copytree(source / "server" / "task_adapter", staging, dirs_exist_ok=True)
    atomic_write_json(target.parent / "task_adapter.json", {**saved, "copied_from": str(source.resolve())})


def run_settings(cfg: RunConfig, counts: UserCounts) -> dict:
    """What must match for --resume to continue a run (saved as run.json once its node stores exist)."""
    return {"config": cfg.to_record(), "num_clients": counts.test, "train_clients": counts.train}


def simulate(
    cfg: RunConfig, counts: UserCounts, options: SimulationOptions, client_app: ClientAppFactory | None = None
) -> tuple[Path, dict]:
    """Prepare node stores, run the Flower simulation; (run dir, outcome with the report if it finished). The run
    directory is held (hold_run_dir) while it runs.

    `client_app(run_dir)` builds the ClientApp instead of ours (the privacy and fault tests run leaky or faulty ones).
    """
    import torch

    resources = client_resources(
        options.cpus_per_client, options.gpus_per_client, cfg.device, torch.cuda.device_count(),
        len(os.sched_getaffinity(0)),
    )
    if options.task_adapter_from and options.resume:
        raise SetupError("--task-adapter-from: a resumed run keeps its own task adapter; give one of the two")
    run_dir = prepare_run_dir(cfg, counts, options).resolve()
    with hold_run_dir(run_dir):
        return run_dir, _run_in(run_dir, cfg, counts, options, resources, client_app)


def _run_in(run_dir: Path, cfg: RunConfig, counts: UserCounts, options: SimulationOptions, resources: dict,
            client_app: ClientAppFactory | None) -> dict:
    """simulate's work in the run directory it holds: node stores, then Flower's engine; the outcome."""
    from common.store import atomic_write_json
    from simulation.node_stores import plant_canaries, write_partitions

    if options.task_adapter_from:
        copy_task_adapter(options.task_adapter_from, run_dir, cfg, counts, options.canaries)
    if options.ray_address:
        from simulation.ray_cluster import join_ray_cluster

        join_ray_cluster(options.ray_address, run_dir, options.cache_dir)
    if options.resume and (run_dir / "nodes.json").exists():  # the stores of the interrupted run stay as they are
        nodes = read_run_state(run_dir / "nodes.json")
    else:
        test, train = partition_users(cfg, counts)
        nodes = write_partitions(run_dir, test, train, plant_canaries(test + train) if options.canaries else {})
        atomic_write_json(run_dir / "run.json", run_settings(cfg, counts))
    # Flower's engine and the apps are imported only now, so bad data stops the run quickly and quietly
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import ServerOptions, make_server_app
    from simulation.waiting import install_patient_extractor

    install_patient_extractor()  # the engine's wait for replies, nearly free (simulation/waiting.py)
    log.info("run directory %s: %d nodes", run_dir, len(nodes))
    if options.cache_dir:  # the nodes' model cache (a simulated node has no node config of its own to say it)
        os.environ["OPPU_CACHE_DIR"] = str(options.cache_dir.resolve())
    opts = ServerOptions(
        run_dir=run_dir, cache_dir=options.cache_dir, expected_nodes=len(nodes),
        timeout=options.timeout,
    )
    with run_log(run_dir, options.verbose):  # every library's lines, DEBUG and up (the console shows ours)
        run_simulation(
            server_app=make_server_app(cfg, opts),
            client_app=(client_app or make_client_app)(run_dir),  # nodes find their store in run_dir by partition id
            num_supernodes=len(nodes),
            backend_config={
                "client_resources": {**resources, **WORKER_FAULT_TOLERANCE},
                # the workers' own output (progress bars, warnings) reaches the console only with --verbose
                "init_args": {"logging_level": logging.WARNING, "log_to_driver": options.verbose,
                              **({} if options.ray_address else {"_node_ip_address": LOCAL_RAY_ADDRESS})},
            },
        )
    return opts.outcome


def run_config_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    """The RunConfig named by the parsed flags; a bad value ends with one line naming it (exit status 2)."""
    record = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(RunConfig)}}
    try:
        return RunConfig(**record)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_console(args.verbose)
    cfg = run_config_of(args, parser)
    start = time.perf_counter()
    try:
        check_run_flags(args, cfg)
        run_dir, outcome = simulate(cfg, user_counts(args), SimulationOptions.from_args(args))
    except SetupError as e:
        return setup_failure(parser.prog, e, args.verbose)
    except KeyboardInterrupt:
        stop_now(parser.prog, args.run_dir)
    report = outcome.get("report")
    if report is None:
        print(f"flower-simulation: the server app did not finish; see the log above ({run_dir})", file=sys.stderr)
        return 1
    print((run_dir / "report.md").read_text())
    print(f"wall time {time.perf_counter() - start:.0f} s; report: {run_dir / 'report.md'}; "
          f"privacy audit: oppu-audit {run_dir}")
    return exit_status(parser.prog, report, user_counts(args), args.allow_failed_updates)


if __name__ == "__main__":
    sys.exit(main())
