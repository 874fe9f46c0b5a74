"""The shared task LoRA on a device: its seeded initial state, one round of local adaptation on a training user,
and the task-adapted base (the LoRA merged in) that every method of a test user starts from."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.adapters import (
    adapter_state,
    attach_fresh,
    derived_seed,
    load_adapter_state,
    peft_config,
)
from client.data import User
from client.model_loading import load_base
from client.quantize import dequantized_copy
from client.training import Example, history_examples, query_examples, train_adapter
from common.config import PeftSettings, RunConfig
from common.store import atomic_directory
from common.tasks import TaskSpec, get_task

TASK_ADAPTER = "task"


def task_lora(cfg: RunConfig) -> PeftSettings:
    """The shared task adapter is always a LoRA of the configured rank."""
    return PeftSettings(kind="lora", r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.peft_settings().target_modules)


def remove_adapters(model: PeftModel) -> PreTrainedModel:
    """Take every adapter out of the shared base again (unmerged), so the next user starts clean."""
    if model.active_peft_config.is_prompt_learning:
        return model.get_base_model()
    return model.unload()


def initial_task_state(base: PreTrainedModel, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """A freshly initialised task LoRA (seeded), as the server starts FedAvg from (on a weightless base,
    client/model_loading.load_weightless)."""
    model = attach_fresh(base, task_lora(cfg), TASK_ADAPTER, derived_seed(cfg.seed, "task"))
    try:
        return adapter_state(model, TASK_ADAPTER)
    finally:
        remove_adapters(model)


def task_examples(
    user: User, task: TaskSpec, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig, server_round: int,
    profile: str | None = None,
) -> list[Example]:
    """A training user's task-adaptation examples: its queries, then its `cfg.task_history` latest items.

    Each example gets one of the retrieval depths the configured methods use (seeded by user and round), so the
    shared model learns every prompt format it will be evaluated with at no extra cost. A `profile` goes into the
    history items' prompts (bench.task_fedavg --level-prompt).
    """
    by_depth = [
        query_examples(user, task, tokenizer, cfg.prompt_settings(k))
        + history_examples(user, task, tokenizer, cfg.prompt_settings(k, use_profile=profile is not None), profile,
                           max_items=cfg.task_history or None)
        for k in cfg.retrieval_depths()
    ]
    rng = random.Random(derived_seed(cfg.seed, user.user_id, server_round, "depths"))
    return [rng.choice(variants) for variants in zip(*by_depth)]


def task_adaptation_step(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: RunConfig,
    user: User,
    global_state: dict[str, torch.Tensor],
    server_round: int,
) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
    """Local training of the task LoRA on a training user's examples: (new state, #examples, metrics)."""
    examples = task_examples(user, get_task(cfg.task), tokenizer, cfg, server_round)
    model = attach_fresh(base, task_lora(cfg), TASK_ADAPTER, 0)
    try:
        load_adapter_state(model, TASK_ADAPTER, global_state)
        metrics = train_adapter(
            model, examples, tokenizer.pad_token_id, cfg.task_training(server_round),
            seed=derived_seed(cfg.seed, user.user_id, server_round), desc=f"task adapter, user {user.user_id}",
        )
        return adapter_state(model, TASK_ADAPTER), len(examples), metrics
    finally:
        remove_adapters(model)


_merged_cache: dict[tuple[Path, str, str, str, str], PreTrainedModel] = {}


def task_adapted_base(
    model_dir: Path, device: str, cfg: RunConfig, task_state: dict[str, torch.Tensor] | None, state_hash: str
) -> PreTrainedModel:
    """The base with the task LoRA merged in; built once per (model, task adapter) in each process. A 4-bit base
    (--quantize) gets it merged into a dequantized copy of the adapted layers (client/quantize.py says why)."""
    pristine = load_base(model_dir, device, cfg.dtype, cfg.quantize)[0]
    if task_state is None:
        return pristine
    key = (model_dir, device, cfg.dtype, cfg.quantize, state_hash)
    if key not in _merged_cache:
        _merged_cache.clear()  # one merged copy at a time bounds memory
        _merged_cache[key] = merge_task_state(pristine, cfg, task_state)
    return _merged_cache[key]


def merge_task_state(pristine: PreTrainedModel, cfg: RunConfig, task_state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A copy of `pristine` with the task LoRA `task_state` merged into the adapted layers; `pristine` stays as it was."""
    settings = task_lora(cfg)
    copied = (copy_targets if cfg.quantize == "none" else dequantized_copy)(pristine, settings.target_modules)
    model = attach_fresh(copied, settings, TASK_ADAPTER, 0)
    load_adapter_state(model, TASK_ADAPTER, task_state)
    return model.merge_and_unload()


def copy_targets(model: PreTrainedModel, targets: tuple[str, ...]) -> PreTrainedModel:
    """A copy of `model` that owns only the weights of the `targets` modules and shares every other tensor.

    Merging a LoRA on q,v changes about a tenth of SmolLM2's weights, so the task-adapted base costs that
    tenth instead of a second full model in every worker.
    """
    shared = {id(p): p for name, p in model.named_parameters() if name.split(".")[-2] not in targets}
    return copy.deepcopy(model, memo=shared)


def save_task_adapter(cfg: RunConfig, state: dict[str, torch.Tensor], target: Path) -> None:
    """The task LoRA `state` as standard peft files (adapter_config.json, adapter_model.safetensors) in `target`,
    replacing an older copy in one rename; written from the state alone, so the server loads no model for it."""
    config = peft_config(task_lora(cfg))
    config.base_model_name_or_path = cfg.model
    with atomic_directory(target, replace=True) as staging:
        config.save_pretrained(str(staging))
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(staging / "adapter_model.safetensors"))
