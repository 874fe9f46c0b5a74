"""Flower ClientApp: one handler per phase, registered under the phase's action (common/protocol.py); each reads its
config, calls client code, wraps the result.

A node finds its user through its node config only (`user-dir`, and `audit-dir` for its half of the audit log):
a SuperNode is started with them, and for a simulated node `node_config_mod` (client/partition.py) fills them in
from its `partition-id` before any handler runs. The node's model cache is `model-cache` in the node config, else
$OPPU_CACHE_DIR, else ~/.cache/oppu-fl.

Each handler imports what only it needs inside itself: a SuperNode starts a fresh ClientApp process per message, and
a message that loads no model (an announce, a model chunk, the item-table round) should not pay for loading torch,
transformers and peft (tests/test_model.py runs those handlers in a fresh process and checks).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from client.audit_mod import audit_mod
from client.memory import free_memory_mod
from client.partition import node_config_mod
from common import protocol as p
from common.secure_update import masks_from_whole_seed

if TYPE_CHECKING:
    import torch

    from common.config import RunConfig

log = logging.getLogger(__name__)
Handler = Callable[[Message, Context], Message]
# SecAgg+'s masks from their whole seed, not Flower's 32 bits of it (common/secure_update.py); the server does the same
importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod").pseudo_rand_gen = masks_from_whole_seed


def _cache_dir(context: Context) -> Path | None:
    cache = context.node_config.get("model-cache")
    return Path(str(cache)) if cache else None


def node_user(context: Context):
    """The one user this node holds (read from its own store), that user's role, and the store's directory."""
    from client.data import load_oppu

    user_dir = Path(str(context.node_config["user-dir"]))
    record = json.loads((user_dir / "data.json").read_text())
    return load_oppu(user_dir / "data.json", record["task"])[0], record["role"], user_dir


def _run_config(config: ConfigRecord):
    """(run config, announced base-model hash) of a message's config: the run config plus the server's keys."""
    from common.config import RunConfig

    config = dict(config)
    model_sha = str(config.pop(p.MODEL_SHA256))
    for key in (p.MODEL_NAME, p.SERVER_ROUND, p.TASK_ADAPTER_SHA256, p.CONSTANT_ANSWER, p.TASK_ADAPTER_NAMES,
                p.ROUND_CLIENTS, p.SECURE_PAYLOAD, p.ANSWER_QUANTILE, *p.ITEM_TABLE_KEYS):
        config.pop(key, None)
    return RunConfig.from_record(config), model_sha


def seen_user(user, role: str, cfg: RunConfig):
    """The node's user as this run may read it: a test user's validation view under --split validation (its latest
    items become the questions, which its history then lacks), else the user."""
    from client.history import validation_view
    from common.tasks import get_task

    task = get_task(cfg.task)
    return validation_view(user, task, cfg.validation_items) if role == "test" and cfg.split == "validation" else user


def annotated(user, role: str, cfg: RunConfig, config: ConfigRecord):
    """(`user` with each question and history item reading what the other users say of its item, the readings of
    the queries' items) under --item-statistics, from the table the message carries; else (`user`, [])."""
    from client.item_statistics import annotate, others_table, query_readings
    from common.item_table import ItemTable
    from common.tasks import get_task

    if not cfg.uses_item_table():
        return user, []
    table = ItemTable.from_config(config)
    if table is None:
        raise RuntimeError("item-statistics is on, but the message carries no item table")
    task = get_task(cfg.task)
    rest = others_table(user, role, task, table, cfg.item_dp_clip if table.noise_std else None)
    return annotate(user, task, rest), query_readings(user, task, rest)


def personal_user(user, role: str, cfg: RunConfig, config: ConfigRecord | dict):
    """(the user as personal training, retrieval and evaluation see it: `seen_user`, `annotated` and the history
    `select_history` keeps; the readings of the queries' items). `config` carries the item table under
    --item-statistics (a message's config, or the run's server/item_table.json for a benchmark)."""
    from client.history import select_history
    from common.tasks import get_task

    seen, readings = annotated(seen_user(user, role, cfg), role, cfg, config)
    return select_history(seen, get_task(cfg.task), cfg), readings


def _setup(config: ConfigRecord, context: Context):
    """Run config, base model (the exact one the server announced) and tokenizer for a message's config."""
    from client.device import pick_device
    from client.model_cache import find_model_by_hash
    from client.model_loading import load_base

    cfg, model_sha = _run_config(config)
    model_dir = find_model_by_hash(model_sha, _cache_dir(context))
    if model_dir is None:
        raise RuntimeError(f"base model {model_sha[:12]} is not in this node's cache (the announce phase fetches it)")
    device = str(pick_device(cfg.device))
    base, tokenizer = load_base(model_dir, device, cfg.dtype, cfg.quantize)
    return cfg, model_dir, model_sha, device, base, tokenizer


def announce(msg: Message, context: Context) -> Message:
    """Tell the server this node's role and whether it already holds the announced base model."""
    from client.model_cache import find_model_by_hash

    _, role, _ = node_user(context)
    has_model = find_model_by_hash(str(msg.content[p.CONFIG][p.MODEL_SHA256]), _cache_dir(context)) is not None
    return Message(RecordDict({p.CONFIG: ConfigRecord({p.ROLE: role, p.HAS_MODEL: has_model})}), reply_to=msg)


def model_chunk(msg: Message, context: Context) -> Message:
    """Store one chunk of the base model; the last chunk installs it after hash checks."""
    from client.model_transfer import receive_model_chunk

    c = msg.content[p.CONFIG]
    installed = receive_model_chunk(
        str(c[p.MODEL_SHA256]), str(c[p.MODEL_NAME]), str(c[p.CHUNK_FILE]), int(c[p.CHUNK_OFFSET]),
        bytes(c[p.CHUNK_DATA]), str(c[p.CHUNK_FILE_SHA256]), int(c[p.CHUNK_FILE_SIZE]), bool(c[p.CHUNK_LAST]),
        _cache_dir(context),
    )
    return Message(RecordDict({p.CONFIG: ConfigRecord({p.CHUNK_STORED: installed})}), reply_to=msg)


def _adapt_locally(config: ConfigRecord, state: dict[str, torch.Tensor], context: Context):
    """One round of local task adaptation from the global task LoRA `state`: (run config, new state, example
    count, training loss, the user's answer-label shares ([] for a task without labels))."""
    from client.references import answer_frequencies
    from client.task_adapter import task_adaptation_step
    from common.tasks import get_task

    cfg, _, _, _, base, tokenizer = _setup(config, context)
    user, role, _ = node_user(context)
    user, _ = annotated(seen_user(user, role, cfg), role, cfg, config)
    new_state, num_examples, metrics = task_adaptation_step(base, tokenizer, cfg, user, state, int(config[p.SERVER_ROUND]))
    task = get_task(cfg.task)
    return cfg, new_state, num_examples, metrics["loss"], answer_frequencies(task, user) if task.labels else []


def adapt(msg: Message, context: Context) -> Message:
    """Task adaptation in clear: local steps on the shared task LoRA; reply with it and the example count. With
    --local-dp-epsilon, Flower's LocalDpMod clips the update and adds Gaussian noise before the reply leaves."""
    from client.defenses import local_dp_mod

    local_dp = local_dp_mod(_run_config(msg.content[p.CONFIG])[0])
    return local_dp(msg, context, _adapt_in_clear) if local_dp else _adapt_in_clear(msg, context)


def _adapt_in_clear(msg: Message, context: Context) -> Message:
    """The clear reply: the new task LoRA and what the configured defense lets go with it (client/defenses.py)."""
    import torch  # noqa: F401  (flwr's to_torch_state_dict refuses to run before torch is imported; a SuperNode
    # starts a fresh ClientApp process per message)

    from client.defenses import clear_reply_metrics

    cfg, new_state, num_examples, loss, shares = _adapt_locally(
        msg.content[p.CONFIG], msg.content[p.ARRAYS].to_torch_state_dict(), context
    )
    metrics = clear_reply_metrics(cfg, num_examples, loss, shares)
    reply = RecordDict({p.ARRAYS: ArrayRecord(new_state), p.METRICS: MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


def adapt_secure(msg: Message, context: Context) -> Message:
    """The collect stage of secure-adapt (secaggplus_mod runs the other stages itself and masks this reply): local
    task adaptation, replied as the legacy FitRes the mod reads, holding one vector (update, loss, answer shares;
    common/secure_update.py) of weight 1; with --dp-noise, clipped and with this device's share of the noise
    (client/defenses.py)."""
    config = msg.content[p.FITINS_CONFIG]
    if config.get(p.SECURE_PAYLOAD) == p.ITEM_TABLE:  # before torch: that round loads no model
        return _item_table_reply(msg, context)
    import numpy as np
    import torch
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    from client.defenses import secure_vector

    names = [str(n) for n in config[p.TASK_ADAPTER_NAMES]]  # type: ignore[union-attr]
    global_arrays = [a.numpy() for a in msg.content[p.FITINS_ARRAYS].values()]
    state = {name: torch.from_numpy(array.copy()) for name, array in zip(names, global_arrays, strict=True)}
    cfg, new_state, _, loss, shares = _adapt_locally(config, state, context)
    update = [new_state[name].numpy().astype(np.float64) - g for name, g in zip(names, global_arrays)]
    vector = secure_vector(cfg, update, loss, shares, int(config[p.ROUND_CLIENTS]))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), 1, {})
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _item_table_reply(msg: Message, context: Context) -> Message:
    """The collect stage of the item-table round (--item-statistics): a training user's item table as the one
    vector, weight 1, which secaggplus_mod masks (under --item-dp-epsilon clipped and with this node's share of
    the noise); no model is loaded. A test user's node refuses: it sends metric statistics only."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    from client.item_statistics import sent_vector
    from common.secure_update import on_quantization_grid

    config = msg.content[p.FITINS_CONFIG]
    cfg, _ = _run_config(config)
    user, role, _ = node_user(context)
    if role != "train":
        raise RuntimeError("the item-table round asked a test user's node: only training users send item tables")
    round_clients = int(config[p.ROUND_CLIENTS])
    vector = on_quantization_grid(sent_vector(user, cfg, round_clients), round_clients)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), 1, {})
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def calibrate(msg: Message, context: Context) -> Message:
    """The shared model's mean absolute error at each answer quantile on this test user's latest items before its
    questions (client/calibration.py); reply with those metric statistics only."""
    from client.calibration import calibration_errors
    from client.task_adapter import task_adapted_base

    config = msg.content[p.CONFIG]
    cfg, model_dir, _, device, _, tokenizer = _setup(config, context)
    user, role, _ = node_user(context)
    if role != "test":
        raise RuntimeError("the calibration round asked a training user's node: test users calibrate")
    seen, _ = annotated(seen_user(user, role, cfg), role, cfg, config)
    arrays = msg.content[p.ARRAYS]
    merged = task_adapted_base(model_dir, device, cfg, arrays.to_torch_state_dict() if len(arrays) else None,
                               str(config.get(p.TASK_ADAPTER_SHA256, "")))
    errors, scored = calibration_errors(merged, tokenizer, cfg, seen)
    metrics: dict[str, int | list[float]] = {p.NUM_EXAMPLES: scored, **({p.QUANTILE_ERRORS: errors} if scored else {})}
    return Message(RecordDict({p.METRICS: MetricRecord(metrics)}), reply_to=msg)


def personalize(msg: Message, context: Context) -> Message:
    """Personal adapters + evaluation of every method on this user's queries; reply with statistics only."""
    from client.personalize import personalize_user
    from client.task_adapter import task_adapted_base
    from common.store import UserStore, atomic_write_json, read_saved_state

    config = msg.content[p.CONFIG]
    cfg, model_dir, model_sha, device, pristine, tokenizer = _setup(config, context)
    user, role, user_dir = node_user(context)
    personal, readings = personal_user(user, role, cfg, config)
    store = UserStore(user_dir.parent.parent, personal.user_id)
    arrays = msg.content[p.ARRAYS]
    task_sha = str(config.get(p.TASK_ADAPTER_SHA256, ""))
    table = [config.get(key) for key in p.ITEM_TABLE_KEYS if key in config]
    quantile = float(config.get(p.ANSWER_QUANTILE, 0.5))  # type: ignore[arg-type]
    result_key = hashlib.sha256(
        json.dumps([cfg.to_record(), model_sha, task_sha, table, quantile], sort_keys=True).encode()
    ).hexdigest()
    stored = read_saved_state(store.result)
    if stored and stored.get("key") == result_key:  # finished before an interruption: same inputs, same result
        results, timings = stored["statistics"], {}
    else:
        task_state = arrays.to_torch_state_dict() if len(arrays) else None
        merged = task_adapted_base(model_dir, device, cfg, task_state, task_sha)
        constant = config.get(p.CONSTANT_ANSWER)
        results, timings = personalize_user(
            cfg, personal, store, merged, pristine, tokenizer, model_sha, task_adapter_sha=task_sha,
            constant=str(constant) if constant is not None else None, readings=readings, answer_quantile=quantile,
        )
        atomic_write_json(store.result, {"key": result_key, "statistics": results, "timings": timings})
    queries = len(personal.queries)
    metrics: dict[str, float | list[float]] = {p.NUM_EXAMPLES: queries}
    for method, stats in results.items():
        for name, value in stats.items():
            metrics[p.method_key(method, name)] = value
    for name, seconds in timings.items():
        metrics[f"time/{name}"] = seconds
    return Message(RecordDict({p.METRICS: MetricRecord(metrics)}), reply_to=msg)


def make_client_app(
    run_dir: Path | None = None, adapt: Handler = adapt, personalize: Handler = personalize,
    adapt_secure: Handler = adapt_secure,
) -> ClientApp:
    """The ClientApp: our handlers (a test may swap the training ones for faulty or leaky ones) behind three mods,
    and Flower's secaggplus_mod on the secure-adapt handler (inside the audit mod, which logs what leaves).

    `run_dir`: the run directory a simulation prepared, where each node's store waits under its partition id.
    """
    client_app = ClientApp(mods=[node_config_mod(run_dir), audit_mod, free_memory_mod])
    client_app.query(p.action(p.ANNOUNCE))(announce)
    client_app.query(p.action(p.MODEL_CHUNK))(model_chunk)
    client_app.train(p.action(p.ADAPT))(adapt)
    client_app.evaluate(p.action(p.CALIBRATE))(calibrate)
    client_app.train(p.action(p.PERSONALIZE))(personalize)
    client_app.train(mods=[secaggplus_mod])(adapt_secure)  # Flower's SecAgg+ messages are plain `train`
    return client_app
