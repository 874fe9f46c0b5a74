"""The run's flags: the parser (also a study's subcommand and `oppu-deploy`'s), and the checks made on them
before a run writes anything or any process starts."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

from client.adapters import ia3_layers_known
from client.model_build import UnknownModelError, linear_module_names, model_type, resolve_model
from client.model_cache import CACHE_DIR_HELP
from client.quantize import quantization_problem
from common.config import PHASE_TIMEOUT, RUN_KEYS, RunConfig, UserCounts
from common.exit_status import BAD_INPUT
from simulation.errors import SetupError
from simulation.run_dir import RUNS_DIR


def train_clients(text: str) -> int | None:
    """--train-clients: a number of training users, or 'all' (None): every user outside the test users."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of training users or 'all', got {text!r}") from None


def cpu_share(text: str) -> float:
    """--cpus-per-client: cores > 0 (a fraction runs more clients than cores at once; 0 would divide by zero)."""
    try:
        share = float(text)
    except ValueError:
        share = 0.0
    if not (math.isfinite(share) and share > 0):
        raise argparse.ArgumentTypeError(f"expected a number of cores > 0, got {text!r}")
    return share


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


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, where it tells something: not 'None' or 'False' (an unset path, an off
    switch), and not twice where the help text already says the default in its own words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(simulation: bool = True) -> argparse.ArgumentParser:
    """Flags: the run's own plus one per RunConfig field, with its help text and default.

    `simulation=False` leaves out what only the simulation engine has (resume, Ray resources).
    """
    parser = argparse.ArgumentParser(
        prog="flower-simulation",
        description="Federated OPPU (One PEFT Per User) on Flower's simulation engine: every user is one node; "
        "task adaptation by FedAvg over training users, then each test user trains private adapters "
        "on-device and sends back metric statistics only.",
        formatter_class=DefaultsHelpFormatter,
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
    run.add_argument("--train-clients", type=train_clients,
                     default="all" if simulation else RUN_KEYS["train-clients"],  # ("all": UserCounts.train, None)
                     help="training-user nodes (a seeded sample of the other users, or 'all' of them: the "
                          "simulation's default, the paper's split); each round samples --train-per-round of them")
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
        run.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
        run.add_argument("--cpus-per-client", type=cpu_share, default=1.0, help="CPU cores per simulated client (Ray)")
        run.add_argument("--gpus-per-client", type=gpu_share, default="auto",
                         help="GPU share per simulated client (Ray): a number, or 'auto': the visible GPUs shared "
                         "evenly by the clients that run at once (--device auto or cuda; 0 without a GPU)")
        run.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                         help="join this existing Ray cluster (`ray start --head` printed it) instead of starting Ray "
                         "here; every machine must see --run-dir (and --cache-dir) at the same path, checked first")
        run.add_argument("--canaries", action="store_true",
                         help="plant a unique marker string in every user's history; `oppu-audit` checks none is sent")
        run.add_argument("--record-server-view", action="store_true",
                         help="keep what the server holds of each task-adaptation round (the LoRA it sent, each "
                         "update it can attribute to a node) in <run-dir>/server/view/, for attacks such as "
                         "bench/attack.py; a run without it keeps only the average")
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
        if isinstance(f.default, bool):  # a switch: --x turns it on, --no-x off
            method.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            method.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])


def check_run_flags(args: argparse.Namespace, cfg: RunConfig, run_dir: Path | None = None,
                    clients_here: bool = True) -> None:
    """What RunConfig cannot judge alone, checked before the run writes anything or any process starts; the base
    model is resolved here (built into the model cache on first use, as the server would), so an unknown --model
    stops the run before Ray does. `clients_here` False: the clients run on other machines (`oppu-deploy run`),
    whose GPUs this one cannot see, so --quantize is theirs to refuse."""
    counts = user_counts(args)
    training = counts.training(cfg)  # (None: every user outside the test users, counted when the data is read)
    per_round = cfg.nodes_per_round(training)
    if cfg.rounds and training == 0:
        raise SetupError(f"--train-clients 0: task adaptation (--rounds {cfg.rounds}) needs training users; give "
                         "--train-clients 1 or more, or skip task adaptation with --rounds 0")
    if cfg.secure_aggregation and cfg.rounds and per_round < 2:
        raise SetupError(f"--secure-aggregation: SecAgg+ needs 2 or more training users per round, got {per_round} "
                         "(--train-clients, --train-per-round)")
    if cfg.uses_item_table() and training is not None and training < 2:
        raise SetupError(f"--item-statistics: the item table is summed over 2 or more training users' nodes (SecAgg+), "
                         f"got {training} (--train-clients, and --rounds above 0); --no-item-statistics turns it off")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise SetupError(f"--timeout {args.timeout}: expected a finite number of seconds > 0")
    _check_directory_flag("--run-dir", run_dir or getattr(args, "run_dir", None) or RUNS_DIR,
                          "a directory (new, or an earlier run with --resume)")
    for flag, expected in (("cache_dir", "a directory for the model cache"),
                           ("node_caches", "a directory for the nodes' model caches")):
        if getattr(args, flag, None):
            _check_directory_flag(f"--{flag.replace('_', '-')}", getattr(args, flag), expected)
    quantization = quantization_problem(cfg.quantize, cfg.device) if clients_here else None
    if quantization:
        raise SetupError(quantization)
    try:
        _check_model(cfg, getattr(args, "cache_dir", None))
    except (UnknownModelError, FileNotFoundError) as e:  # (FileNotFoundError: the default model's package is missing)
        raise SetupError(str(e)) from e


def _check_model(cfg: RunConfig, cache_dir: Path | None) -> None:
    """--model is at hand (built into the cache) and has the layers --lora-targets and --peft name: read from its
    config first, so a wrong flag is refused before a model is fetched, converted or copied."""
    modules = linear_module_names(cfg.model, cache_dir)
    if modules is not None:
        unknown = [t for t in cfg.peft_settings().target_modules if t not in modules]
        if unknown:
            raise SetupError(f"--lora-targets {cfg.lora_targets}: {', '.join(unknown)} names no linear layer of "
                             f"--model {cfg.model}; expected names from {', '.join(modules)}")
    architecture = model_type(cfg.model, cache_dir)
    if cfg.peft == "ia3" and architecture is not None and not ia3_layers_known(architecture):
        raise SetupError(f"--peft ia3: peft does not know which layers of a {architecture} model (--model {cfg.model}) "
                         "IA3 scales; use --peft lora or prompt")
    resolve_model(cfg.model, cache_dir)


def user_counts(args: argparse.Namespace) -> UserCounts:
    """--num-clients and --train-clients; a bad count is a SetupError."""
    try:
        return UserCounts(args.num_clients, args.train_clients)
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


def run_config_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    """The RunConfig named by the parsed flags; a bad value ends with one line naming it (exit status 2)."""
    record = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(RunConfig)}}
    try:
        return RunConfig(**record)
    except ValueError as e:
        parser.exit(BAD_INPUT, f"{parser.prog}: {e}\n")
