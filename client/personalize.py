"""What a device does for OPPU, free of any Flower code: task-adapter steps and per-user personalization.

- `task_adaptation_step`: a training user's local steps on the shared task LoRA (FedAvg input).
- `personalize_user`: a test user's personal adapters, trained fresh on their own history only, and
  every method evaluated on their queries; returns metric statistics only.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.adapters import PeftSettings, adapter_state, attach_fresh, load_adapter_state, personal_adapter_name
from client.config import Method, RunConfig, parse_method
from client.data import User
from client.evaluate import predict, query_prompts
from client.export import TRAINING_RECORD
from client.metrics import Statistics, statistics
from client.model import load_base
from client.profile import user_profile
from client.references import reference_predictions
from client.store import UserStore, atomic_save_adapter, atomic_write_json
from client.tasks import get_task
from client.training import history_examples, query_examples, train_adapter

log = logging.getLogger(__name__)

TASK_ADAPTER = "task"


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (same run seed + user + variant -> same initialisation)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def task_lora(cfg: RunConfig) -> PeftSettings:
    """The shared task adapter is always a LoRA of the configured rank."""
    return PeftSettings(kind="lora", r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.peft_settings().target_modules)


def _remove_adapters(model: PeftModel) -> PreTrainedModel:
    """Take every adapter out of the shared base again (unmerged), so the next user starts clean."""
    if model.active_peft_config.is_prompt_learning:
        return model.get_base_model()
    return model.unload()


def initial_task_state(base: PreTrainedModel, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """A freshly initialised task LoRA (seeded), as the server starts FedAvg from."""
    model = attach_fresh(base, task_lora(cfg), TASK_ADAPTER, derived_seed(cfg.seed, "task"))
    try:
        return adapter_state(model, TASK_ADAPTER)
    finally:
        _remove_adapters(model)


def task_adaptation_step(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: RunConfig,
    user: User,
    global_state: dict[str, torch.Tensor],
    server_round: int,
) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
    """Local training of the task LoRA on a training user's examples: (new state, #examples, metrics).

    Each example gets one of the retrieval depths the configured methods use (seeded choice), so the
    shared model learns every prompt format it will be evaluated with at no extra cost.
    """
    task = get_task(cfg.task)
    depths = sorted({parse_method(m).k for m in cfg.method_names()})
    by_depth = [
        query_examples(user, task, tokenizer, cfg.prompt_settings(k))
        + history_examples(user, task, tokenizer, cfg.prompt_settings(k), max_items=cfg.task_history or None)
        for k in depths
    ]
    rng = random.Random(derived_seed(cfg.seed, user.user_id, server_round, "depths"))
    examples = [rng.choice(variants) for variants in zip(*by_depth)]
    model = attach_fresh(base, task_lora(cfg), TASK_ADAPTER, 0)
    try:
        load_adapter_state(model, TASK_ADAPTER, global_state)
        metrics = train_adapter(
            model, examples, tokenizer.pad_token_id, cfg.task_training(),
            seed=derived_seed(cfg.seed, user.user_id, server_round), desc=f"task adapter, user {user.user_id}",
        )
        return adapter_state(model, TASK_ADAPTER), len(examples), metrics
    finally:
        _remove_adapters(model)


_merged_cache: dict[tuple[Path, str, str, str], PreTrainedModel] = {}


def task_adapted_base(
    model_dir: Path, device: str, cfg: RunConfig, task_state: dict[str, torch.Tensor] | None, state_hash: str
) -> PreTrainedModel:
    """The base with the task LoRA merged in; built once per (model, task adapter) in each process."""
    pristine = load_base(model_dir, device, cfg.dtype)[0]
    if task_state is None:
        return pristine
    key = (model_dir, device, cfg.dtype, state_hash)
    if key not in _merged_cache:
        _merged_cache.clear()  # one merged copy at a time bounds memory
        settings = task_lora(cfg)
        model = attach_fresh(copy_targets(pristine, settings.target_modules), settings, TASK_ADAPTER, 0)
        load_adapter_state(model, TASK_ADAPTER, task_state)
        _merged_cache[key] = model.merge_and_unload()
    return _merged_cache[key]


def copy_targets(model: PreTrainedModel, targets: tuple[str, ...]) -> PreTrainedModel:
    """A copy of `model` that owns only the weights of the `targets` modules and shares every other tensor.

    Merging a LoRA on q,v changes about a tenth of SmolLM2's weights, so the task-adapted base costs that
    tenth instead of a second full model in every worker.
    """
    shared = {id(p): p for name, p in model.named_parameters() if name.split(".")[-2] not in targets}
    return copy.deepcopy(model, memo=shared)


def _kept(user: User, predictions: list[str], probabilities: list[list[float]] | None = None) -> list[dict[str, object]]:
    """What the device keeps of one row's predictions (with the label probabilities where there are some)."""
    return [
        {"id": q.id, "prediction": pred, "gold": q.gold, **({"probabilities": probabilities[i]} if probabilities else {})}
        for i, (q, pred) in enumerate(zip(user.queries, predictions))
    ]


def personalize_user(
    cfg: RunConfig,
    user: User,
    store: UserStore,
    merged: PreTrainedModel,
    pristine: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_hash: str,
    progress: bool = False,
    task_adapter_sha: str = "",
    constant: str | None = None,
) -> tuple[dict[str, Statistics], dict[str, float]]:
    """Train this user's personal adapters, evaluate every method and reference row; (statistics per row, timings).

    `constant` is the best constant answer the server learned from training users (its reference row).
    Adapters and predictions are written to the user's node-local store; only the statistics are returned.
    """
    task = get_task(cfg.task)
    methods = [parse_method(m) for m in cfg.method_names()]
    golds = [q.gold for q in user.queries]
    profile = None
    timings: dict[str, float] = {}
    if any(m.profile for m in methods):
        start = time.perf_counter()
        profile = user_profile(
            pristine, tokenizer, task, user, store.profile, model_hash, cfg.seed, cfg.profile_items
        )
        timings["profile-seconds"] = time.perf_counter() - start
    variants: dict[str, Method] = {}
    for m in methods:
        if m.personal:
            variants.setdefault(m.variant, m)
    peft_model: PeftModel | None = None
    try:
        for variant, method in variants.items():
            name = personal_adapter_name(user.user_id, variant)
            peft_model = attach_fresh(
                peft_model or merged, cfg.peft_settings(), name, derived_seed(cfg.seed, user.user_id, variant)
            )
            examples = history_examples(
                user, task, tokenizer, cfg.prompt_settings(method.k, method.profile, cfg.history_format), profile,
                cfg.max_history or None,
            )
            result = train_adapter(
                peft_model, examples, tokenizer.pad_token_id, cfg.personal_training(),
                seed=derived_seed(cfg.seed, user.user_id, variant, "order"),
                desc=f"user {user.user_id} adapter {variant}", progress=progress,
            )
            timings[f"train-{variant}-seconds"] = result["seconds"]
            atomic_save_adapter(peft_model, name, store.adapter(name))
            atomic_write_json(store.adapter(name) / TRAINING_RECORD, {
                "base_model_sha256": model_hash, "task_adapter_sha256": task_adapter_sha, "task": task.name,
                "variant": variant, "seed": cfg.seed, "config": cfg.to_record(),
            })
        results: dict[str, Statistics] = {}
        kept: dict[str, list[dict[str, object]]] = {}
        start = time.perf_counter()
        for method in methods:
            prompts = query_prompts(user, task, tokenizer, cfg.prompt_settings(method.k, method.profile), profile)
            if method.personal:
                assert peft_model is not None
                peft_model.set_adapter(personal_adapter_name(user.user_id, method.variant))
                predictions, probabilities = predict(peft_model, tokenizer, task, prompts, rule=cfg.decision)
            else:
                with peft_model.disable_adapter() if peft_model else nullcontext():
                    predictions, probabilities = predict(
                        peft_model or merged, tokenizer, task, prompts, rule=cfg.decision
                    )
            results[method.name] = statistics(task, predictions, golds)
            kept[method.name] = _kept(user, predictions, probabilities)
        timings["evaluate-seconds"] = time.perf_counter() - start
        for name, predictions in reference_predictions(task, user, constant).items():
            results[name] = statistics(task, predictions, golds)
            kept[name] = _kept(user, predictions)
        atomic_write_json(store.predictions, kept)  # stays on the device, for the user's own inspection
        return results, timings
    finally:
        if peft_model is not None:
            _remove_adapters(peft_model)
