"""One simulated run on Flower's simulation engine (Ray backend): node stores in the run directory, then the
ServerApp and ClientApp under `flwr.simulation.run_simulation`; the report the server app writes."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from flwr.clientapp import ClientApp

from common.config import PHASE_TIMEOUT, RunConfig, UserCounts, run_settings
from common.store import atomic_write_json, read_json
from simulation.console import run_log
from simulation.errors import EngineStopped, SetupError
from simulation.node_stores import partition_users, plant_canaries, write_partitions
from simulation.ray_cluster import join_ray_cluster
from simulation.run_dir import copy_task_adapter, hold_run_dir, prepare_run_dir, read_run_state

log = logging.getLogger("oppu")
ClientAppFactory = Callable[[Path], ClientApp]  # run directory -> the ClientApp its simulated nodes run
# Flower passes client_resources on as Ray actor options: a worker process that dies (killed, out of memory) is
# restarted, and the message it was running is run once more on its replacement (a message that kills every
# worker it runs on then fails alone). Retries cover system failures only: an exception in our code is not retried.
WORKER_FAULT_TOLERANCE = {"max_restarts": -1, "max_task_retries": 1}
# Ray's switch for its local-only mode (the default on macOS and Windows): node address 127.0.0.1, servers bound to
# loopback. On Linux Ray otherwise replaces 127.0.0.1 by the machine's network address and binds its GCS, raylets and
# workers to every interface, with no authentication: anyone who reaches the machine could run code beside the
# users' stores. Read by Ray at import, in the driver (ray_constants) and in every process Ray starts (environment).
RAY_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def client_resources(cpus_per_client: float, gpus_per_client: str | float, device: str, gpus: int, cpus: int,
                     quantize: str = "none") -> dict:
    """Ray resources of one simulated client.

    Ray hides every GPU from an actor that asks for none, so clients told to use CUDA (or 'auto' on a GPU
    host) need a share, and so do clients of a 4-bit base (`quantize`: CUDA only); 'auto' splits the visible GPUs
    evenly among the clients that run at once.
    """
    if gpus_per_client == "auto":
        concurrent = max(1, int(cpus // cpus_per_client))
        share = min(1.0, gpus / concurrent) if device != "cpu" and gpus else 0.0
    else:
        share = float(gpus_per_client)
    on_gpu = (f"--device {device}" if device.startswith("cuda")
              else f"--quantize {quantize}" if quantize != "none" else "")  # what asks for a GPU
    if on_gpu and not share:
        raise SetupError(f"{on_gpu} needs a GPU, but none is visible" if not gpus
                         else f"{on_gpu} with --gpus-per-client 0: Ray would hide the GPU from every client")
    return {"num_cpus": cpus_per_client, "num_gpus": math.floor(share * 1e4) / 1e4}  # Ray counts in 1e-4 units


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
    record_server_view: bool = False  # keep what the server holds of each round (server/view.py)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimulationOptions:
        """The options among parsed flags (a study's subcommand has no --run-dir or --resume: defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def simulate(
    cfg: RunConfig, counts: UserCounts, options: SimulationOptions, client_app: ClientAppFactory | None = None
) -> tuple[Path, dict | None]:
    """Prepare node stores, run the Flower simulation; (run dir, the run's report.json if the server app finished
    it). The run directory is held (hold_run_dir) while it runs.

    `client_app(run_dir)` builds the ClientApp instead of ours (the privacy and fault tests run leaky or faulty ones).
    """
    resources = client_resources(
        options.cpus_per_client, options.gpus_per_client, cfg.device, torch.cuda.device_count(),
        len(os.sched_getaffinity(0)), cfg.quantize,
    )
    if options.task_adapter_from and options.resume:
        raise SetupError("--task-adapter-from: a resumed run keeps its own task adapter; give one of the two")
    run_dir = prepare_run_dir(cfg, counts, options.run_dir, options.resume).resolve()
    with hold_run_dir(run_dir):
        return run_dir, _run_in(run_dir, cfg, counts, options, resources, client_app)


def _run_in(run_dir: Path, cfg: RunConfig, counts: UserCounts, options: SimulationOptions, resources: dict,
            client_app: ClientAppFactory | None) -> dict | None:
    """simulate's work in the run directory it holds: node stores, then Flower's engine; the report it wrote."""
    if options.task_adapter_from:
        copy_task_adapter(options.task_adapter_from, run_dir, cfg, counts, options.canaries)
    if options.ray_address:
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
    from simulation.node_ids import install_seeded_node_ids
    from simulation.waiting import install_patient_extractor, wait_for_reply

    install_patient_extractor()  # the engine's wait for replies, nearly free (simulation/waiting.py)
    install_seeded_node_ids(cfg.seed)  # the same flags sample the same users (simulation/node_ids.py)
    log.info("run directory %s: %d nodes", run_dir, len(nodes))
    if options.cache_dir:  # the nodes' model cache (a simulated node has no node config of its own to say it)
        os.environ["OPPU_CACHE_DIR"] = str(options.cache_dir.resolve())
    opts = ServerOptions(run_dir=run_dir, cache_dir=options.cache_dir, expected_nodes=len(nodes),
                         timeout=options.timeout, record_view=options.record_server_view,
                         wait_for_reply=wait_for_reply)
    report = run_dir / "report.json"
    report.unlink(missing_ok=True)  # an earlier attempt's: what is there after the engine returns is this one's
    with run_log(run_dir, options.verbose) as log_file, ray_on_loopback(not options.ray_address):
        try:  # (run_log: every library's lines, DEBUG and up, to the log file; the console gets ours)
            run_simulation(
                server_app=make_server_app(cfg, opts),
                # nodes find their store in run_dir by partition id
                client_app=(client_app or make_client_app)(run_dir),
                num_supernodes=len(nodes),
                backend_config={
                    "client_resources": {**resources, **WORKER_FAULT_TOLERANCE},
                    # the workers' own output (progress bars, warnings) reaches the console only with --verbose
                    "init_args": {"logging_level": logging.WARNING, "log_to_driver": options.verbose},
                },
            )
        except Exception as e:
            log.debug("Flower's engine raised", exc_info=True)  # the whole traceback, into the run's log file
            raise EngineStopped(why_stopped(e, resources, log_file)) from e
    return read_json(report)


@contextlib.contextmanager
def ray_on_loopback(local: bool) -> Iterator[None]:
    """While Flower's engine starts and runs a local Ray cluster (`local`), Ray's local-only mode (RAY_LOCAL_ONLY):
    every Ray process listens on 127.0.0.1 only. Undone afterwards, so a later run in this process can join a cluster
    (--ray-address), which needs the machine's network address."""
    if not local:
        yield
        return
    from ray._private import ray_constants  # (the engine imports Ray anyway, a moment later)

    with mock.patch.dict(os.environ, {RAY_LOCAL_ONLY: "0"}), \
            mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False):
        yield


FLOWER_ENGINE_ERROR = "An error was encountered. Ending simulation."  # run_simulation's wrapper of its engine's error


def why_stopped(error: Exception, resources: dict, log_file: Path) -> str:
    """What stopped `run_simulation`: its engine (Ray: the root cause, with the resources each client asked for) or
    the ServerApp (its error, which Flower raises as it was)."""
    if str(error) != FLOWER_ENGINE_ERROR:
        return f"the ServerApp stopped ({type(error).__name__}: {error}); log: {log_file}"
    cause: BaseException = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return (f"Flower's simulation engine stopped ({cause}); each client asked Ray for {resources['num_cpus']:g} "
            f"CPU(s) (--cpus-per-client) and {resources['num_gpus']:g} GPU(s) (--gpus-per-client); log: {log_file}")
