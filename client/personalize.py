"""What a device does for OPPU, free of any Flower code: task-adapter steps and per-user personalization.

- `task_adaptation_step`: a training user's local steps on the shared task LoRA (FedAvg input).
- `personalize_user`: a test user's personal adapters, trained fresh on their own history only, and
  every method evaluated on their queries; returns metric statistics only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.adapters import (
    TRAINING_RECORD,
    atomic_save_adapter,
    attach_fresh,
    derived_seed,
    personal_adapter_name,
)
from client.data import User
from client.evaluate import predict, query_prompts
from client.profile import user_profile
from client.references import reference_predictions
from client.task_adapter import remove_adapters
from client.training import history_examples, train_adapter
from common.config import RunConfig
from common.item_table import ItemReading
from common.methods import Method, parse_method
from common.metrics import Statistics, statistics
from common.store import UserStore, atomic_write_json
from common.tasks import get_task

log = logging.getLogger(__name__)


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
    readings: Sequence[ItemReading] = (),
    answer_quantile: float = 0.5,
) -> tuple[dict[str, Statistics], dict[str, float]]:
    """Train this user's personal adapters, evaluate every method and reference row; (statistics per row, timings).

    `constant` is the best constant answer the server learned from training users (its reference row); `readings`
    the population's reading of each query's item (--item-statistics: two more reference rows); `answer_quantile`
    where the median rule answers for the methods without a personal adapter (--answer-calibration).
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
            pristine, tokenizer, task, user, store.profile, model_hash, cfg.seed, cfg.profile_items,
            cfg.profile_max_tokens,
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
                "variant": variant, "seed": cfg.seed, "quantization": cfg.quantize, "config": cfg.to_record(),
                # the work done, read by benchmarks from the store (in-run MFU); never sent (an export shows it)
                "training": {key: result[key] for key in ("steps", "tokens", "answer_tokens", "seconds")},
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
                        peft_model or merged, tokenizer, task, prompts, rule=cfg.decision, quantile=answer_quantile
                    )
            results[method.name] = statistics(task, predictions, golds)
            kept[method.name] = _kept(user, predictions, probabilities)
        timings["evaluate-seconds"] = time.perf_counter() - start
        for name, predictions in reference_predictions(task, user, constant, readings).items():
            results[name] = statistics(task, predictions, golds)
            kept[name] = _kept(user, predictions)
        atomic_write_json(store.predictions, kept)  # stays on the device, for the user's own inspection
        return results, timings
    finally:
        if peft_model is not None:
            remove_adapters(peft_model)
