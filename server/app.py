"""Flower ServerApp: announce the base model, federated task adaptation, personalization + evaluation.

The server only ever sees: roles and has-model flags, task-LoRA updates of training users, and metric
statistics of test users. It writes everything it produces under the run directory:
    server/task_adapter/   the final global task LoRA (peft files) + task_adapter.json
    report.json, report.md, plot.png
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import console_handler as flower_console
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load_file
from tqdm import tqdm

from client.model_build import resolve_model
from client.model_loading import load_weightless
from client.references import best_constant, reference_names
from client.task_adapter import initial_task_state, save_task_adapter
from common import protocol as p
from common.config import PHASE_TIMEOUT, RunConfig, flwr_run_settings, run_settings, settings_differences
from common.item_table import ItemTable
from common.metrics import decision_rule
from common.model_files import model_hash
from common.store import atomic_write_json, read_json, read_saved_state
from common.tasks import get_task
from server.audited_grid import AuditedGrid
from server.calibration import calibrate_answers
from server.defenses import task_adaptation_defense
from server.distribution import announce, send_model
from server.exchange import exchange
from server.item_statistics import sum_item_tables
from server.report import (
    comparisons,
    method_results,
    method_statistics,
    missing_updates,
    unevaluated_test_users,
    versions,
    write_report,
)
from server.view import ServerView

log = logging.getLogger("oppu")


@dataclass
class ServerOptions:
    """Where the run lives and how the server waits; not part of the method's config."""

    run_dir: Path
    cache_dir: Path | None = None
    expected_nodes: int = 1  # wait for this many connected nodes before announcing
    timeout: float = PHASE_TIMEOUT
    record_view: bool = False  # keep what the server holds of each round (server/view.py: for attacks and tests)
    # the wait between pulls for replies, at most the seconds given; the simulation's ends when a reply is stored
    wait_for_reply: Callable[[float], None] = time.sleep
    # the key nodes are ordered by (replies, the training nodes rounds sample from); under `flwr run`: the id
    # flower-simulation would have given the node (simulation/node_ids.py), so that both give the same run
    node_order: Callable[[int], int] = int


def arrays_sha256(arrays: ArrayRecord) -> str:
    """Content hash of a task adapter (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        digest.update(f"{name}|{array.dtype}|{array.shape}\n".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _message_config(cfg: RunConfig, model_sha: str, item_table: ItemTable | None = None) -> ConfigRecord:
    """A message's config: the run config, the base model, and the population's item table (--item-statistics)."""
    table = item_table.to_config() if item_table is not None else {}
    return ConfigRecord({**cfg.to_record(), p.MODEL_NAME: cfg.model, p.MODEL_SHA256: model_sha, **table})


def adapt_task(
    grid: AuditedGrid, cfg: RunConfig, opts: ServerOptions, model_dir: Path, model_sha: str, train_nodes: list[int],
    item_table: ItemTable | None = None,
) -> tuple[ArrayRecord, dict[str, Any]]:
    """FedAvg rounds of the shared task LoRA over training nodes, skipped when the run directory holds one made
    with the same task-adaptation settings (an interrupted run's, or one --task-adapter-from copied in);
    (the task LoRA, its record: per-round loss and failed updates, the training users' answer-label shares
    averaged as FedAvg averages metrics)."""
    target = opts.run_dir / "server" / "task_adapter"
    key = hashlib.sha256(f"{model_sha}|{sorted(cfg.task_adaptation_settings().items())}".encode()).hexdigest()
    saved = read_saved_state(target.parent / "task_adapter.json")
    if saved and saved["key"] == key:  # an interrupted run's, or one copied in by --task-adapter-from
        log.info("reusing the task adapter in %s (made with the same task-adaptation settings)", target)
        return ArrayRecord(load_file(target / "adapter_model.safetensors")), saved
    initial = ArrayRecord(initial_task_state(load_weightless(model_dir), cfg))  # the server reads no weight
    defense = task_adaptation_defense(cfg, train_nodes, ServerView(opts.run_dir) if opts.record_view else None)
    result = defense.start(grid, initial, opts.timeout, _message_config(cfg, model_sha, item_table))
    # kept with the adapter: a resumed run reports the epsilon its reused adapter was released with
    record = {"key": key, **defense.fedavg.rounds_record(), "differential_privacy": defense.privacy_report()}
    # the adapter's record: the key that says which run made it, its rounds and the training users' answer shares
    # (so a resumed run reports the same rounds, best constant and epsilon)
    save_task_adapter(cfg, result.arrays.to_torch_state_dict(), target)
    atomic_write_json(target.parent / "task_adapter.json", {**record, "sha256": arrays_sha256(result.arrays)})
    return result.arrays, record


def shared_model_config(cfg: RunConfig, model_sha: str, task_arrays: ArrayRecord,
                        item_table: ItemTable | None) -> ConfigRecord:
    """The config of a message that carries the shared model to test users (calibrate, personalize)."""
    config = _message_config(cfg, model_sha, item_table)
    if len(task_arrays):  # (an empty string would break Flower's ConfigRecord.count_bytes)
        config[p.TASK_ADAPTER_SHA256] = arrays_sha256(task_arrays)
    return config


def personalize_and_evaluate(
    grid: Grid, cfg: RunConfig, opts: ServerOptions, model_sha: str, task_arrays: ArrayRecord, test_nodes: list[int],
    constant: str | None = None, item_table: ItemTable | None = None, answer_quantile: float | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every test node personalizes and evaluates; (metric record of each successful node by node id, in id order;
    errors).

    `constant` (the best constant answer, a reference row) travels in the config when task adaptation found one,
    `answer_quantile` (where the shared model's methods answer) when a calibration round picked one.
    """
    config = shared_model_config(cfg, model_sha, task_arrays, item_table)
    if constant is not None:
        config[p.CONSTANT_ANSWER] = constant
    if answer_quantile is not None:
        config[p.ANSWER_QUANTILE] = answer_quantile
    content = RecordDict({p.ARRAYS: task_arrays, p.CONFIG: config})
    messages = [Message(content, dst_node_id=node, message_type=p.PERSONALIZE) for node in test_nodes]
    bar = tqdm(total=len(messages), desc="personalize + evaluate (test users)", unit="user")
    failed = 0

    def on_reply(reply: Message) -> None:
        nonlocal failed
        bar.update(1)
        if reply.has_error():
            failed += 1
            bar.set_postfix(failed=failed)

    replies = exchange(grid, messages, opts.timeout, on_reply)  # in node-id order: the bootstraps' order
    bar.close()
    records = {str(r.metadata.src_node_id): dict(r.content[p.METRICS]) for r in replies if not r.has_error()}
    errors = [f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()]
    errors += [f"no reply within {opts.timeout:.0f} s"] * (len(messages) - len(replies))
    return records, errors


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> None:
    """Block until `count` nodes are connected (nodes register a moment after the server starts)."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {count} nodes connected within {timeout:.0f} s")
        time.sleep(0.5)


def run_oppu(grid: Grid, cfg: RunConfig, opts: ServerOptions) -> dict[str, Any]:
    """The whole federated OPPU run; returns (and writes) the report."""
    grid = AuditedGrid(grid, opts.run_dir / "audit", opts.wait_for_reply, opts.node_order)
    task = get_task(cfg.task)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model_dir = resolve_model(cfg.model, opts.cache_dir)
    model_sha = model_hash(model_dir)
    wait_for_nodes(grid, opts.expected_nodes, opts.timeout)
    nodes, announce_errors = announce(grid, cfg.model, model_sha, opts.timeout)
    lacking = [n.node_id for n in nodes if not n.had_model]
    installed = send_model(grid, lacking, model_dir, cfg.model, model_sha, opts.timeout)
    ready = [n for n in nodes if n.had_model or n.node_id in installed]
    train_nodes = [n.node_id for n in ready if n.role == "train"]
    test_nodes = [n.node_id for n in ready if n.role == "test"]
    errors = [f"node {r.metadata.src_node_id}: announce failed: {r.error.reason}" for r in announce_errors]
    errors += [f"node {n.node_id}: base model could not be installed" for n in nodes if n.role == "test" and n not in ready]
    log.info("%d node(s): %d training user(s), %d test user(s); model sent to %d", len(nodes), len(train_nodes),
             len(test_nodes), len(lacking))
    timings["announce-seconds"] = time.perf_counter() - start

    item_table, item_record = None, None
    if cfg.uses_item_table():
        if len(train_nodes) < 2:
            raise RuntimeError(f"item-statistics: SecAgg+ needs 2 or more training-user nodes, {len(train_nodes)} "
                               f"ready; errors: {errors[:3]}")
        start = time.perf_counter()
        item_table, item_record = sum_item_tables(grid, cfg, _message_config(cfg, model_sha), train_nodes,
                                                  opts.run_dir, opts.timeout)
        timings["item-statistics-seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    task_arrays, adaptation = ArrayRecord(), {}
    if cfg.rounds > 0:
        if not train_nodes:
            raise RuntimeError(
                "task adaptation needs training-user nodes, but none is ready (use --rounds 0 to skip it); "
                f"errors: {errors[:3]}"
            )
        task_arrays, adaptation = adapt_task(grid, cfg, opts, model_dir, model_sha, train_nodes, item_table)
    timings["task-adaptation-seconds"] = time.perf_counter() - start
    constant = best_constant(task, adaptation.get("answer_frequencies", []), decision_rule(task, cfg.decision))
    calibration = None
    if cfg.calibrates_answers():
        start = time.perf_counter()
        calibration = calibrate_answers(grid, shared_model_config(cfg, model_sha, task_arrays, item_table),
                                        task_arrays, test_nodes, opts.run_dir, opts.timeout)
        timings["calibration-seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    unready_test_users = len(errors)
    records, personalize_errors = personalize_and_evaluate(
        grid, cfg, opts, model_sha, task_arrays, test_nodes, constant, item_table,
        calibration["answer_quantile"] if calibration else None,
    )
    errors += personalize_errors
    timings["personalize-seconds"] = time.perf_counter() - start

    # per test node (the server knows nodes, not users): what the paired bootstraps resample
    per_user = {node: method_statistics(record) for node, record in records.items()}
    references = reference_names(task, constant is not None, cfg.uses_item_table())
    report = {
        "config": cfg.to_record(),
        "model": {"name": cfg.model, "sha256": model_sha, "sent_to_nodes": len(lacking)},
        "versions": versions(),
        "users": {
            "test": len(test_nodes) + unready_test_users, "evaluated": len(records), "failed": len(errors),
            "train": len(train_nodes),
        },
        "errors": errors,
        "task_adaptation": {
            "rounds": cfg.rounds,
            "train_loss": adaptation.get("train_loss", {}),  # (.get: a task adapter saved before they were kept)
            "sampled_updates": adaptation.get("sampled_updates", {}),
            "failed_updates": adaptation.get("failed_updates", {}),
            "differential_privacy": adaptation.get("differential_privacy"),
            "secure_aggregation": cfg.secure_aggregation,
            "copied_from": adaptation.get("copied_from"),  # the earlier run whose adapter this one reused
        },
        "item_statistics": item_record,  # nodes whose tables were summed, items and ratings (None: off)
        "calibration": calibration,  # the shared model's answer quantile and its errors (None: the median)
        "decision_rule": decision_rule(task, cfg.decision) if task.labels else None,
        "methods": method_results(task, records.values(), cfg.method_names()),
        # non-LLM predictors from each user's own history (and the training users' best constant)
        "references": method_results(task, records.values(), references),
        "constant_answer": constant,
        "comparisons": comparisons(task, per_user, cfg.method_names(), references),
        "per_user": per_user,
        "timings": timings,
    }
    write_report(opts.run_dir, task, report)
    return report


def make_server_app(cfg: RunConfig, opts: ServerOptions) -> ServerApp:
    """A ServerApp bound to a config (the simulation engine gives ServerApps no run config)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_oppu(grid, cfg, opts)

    return server_app


def run_flwr(grid: Grid, context: Context, wait_for_reply: Callable[[float], None] = time.sleep,
             node_order: Callable[[int], Callable[[int], int]] = lambda seed: int) -> None:
    """What the ServerApp of `flwr run` runs (simulation/flwr_app.py): config from [tool.flwr.app.config] (+
    --run-config overrides); `wait_for_reply` and `node_order(seed)` as ServerOptions. Ends with the report's
    table, as flower-simulation does; a run that is not complete raises, so that Flower marks it failed (`flwr ls`:
    the run's status) where it would report success."""
    for name in ("oppu", "server", "client", "common"):  # our lines through Flower's handler, a ServerApp's only one
        logging.getLogger(name).addHandler(flower_console)
        logging.getLogger(name).setLevel(logging.INFO)
    cfg, counts, run_dir = flwr_run_settings(context.run_config)
    settings = run_settings(cfg, counts)  # the same settings go on in the same run-dir, as --resume would
    if (earlier := read_json(run_dir / "run.json")) and (differ := settings_differences(earlier, settings)):
        raise RuntimeError(f"run-dir {run_dir} holds a run made with other settings ({differ}); give another "
                           "run-dir, or the same settings to go on with that run")
    atomic_write_json(run_dir / "run.json", settings)
    options = ServerOptions(run_dir=run_dir, expected_nodes=counts.nodes(cfg), wait_for_reply=wait_for_reply,
                            node_order=node_order(cfg.seed))
    report = run_oppu(grid, cfg, options)
    log.info("report: %s\n%s", run_dir / "report.md", (run_dir / "report.md").read_text())
    failures = [why for why in (unevaluated_test_users(report, counts.test), missing_updates(report)) if why]
    if failures:
        raise RuntimeError("the run is not complete: " + "; ".join(failures))
