"""PEFT modules: configs for LoRA / (IA)3 / prompt tuning, attaching them fresh, saving and loading.

Adapters are named after their owner ("user-<id>" for personal ones, "task" for the shared one), so a
PeftModel can hold several and switch between them by name, as peft intends.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PromptTuningConfig,
    get_peft_model,
)
from peft.utils import (
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import PreTrainedModel

from common.config import PeftSettings
from common.store import atomic_directory


def peft_config(settings: PeftSettings) -> PeftConfig:
    """The peft config object for these settings."""
    if settings.kind == "lora":
        return LoraConfig(
            r=settings.r, lora_alpha=settings.alpha, target_modules=list(settings.target_modules), lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
    if settings.kind == "ia3":  # peft's layers for the architecture (Llama: k_proj, v_proj and down_proj)
        return IA3Config(task_type="CAUSAL_LM")
    return PromptTuningConfig(num_virtual_tokens=settings.virtual_tokens, task_type="CAUSAL_LM")


def ia3_layers_known(model_type: str) -> bool:
    """Whether peft knows which layers IA3 scales in this architecture (its per-model-type table)."""
    return model_type in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING


def personal_adapter_name(user_id: str, variant: str = "") -> str:
    """The adapter name of a user's personal module (one per retrieval/profile variant)."""
    return f"user-{user_id}" + (f"-{variant}" if variant else "")


def attach_fresh(
    model: PreTrainedModel | PeftModel, settings: PeftSettings, name: str, seed: int
) -> PeftModel:
    """Add a newly initialised adapter `name` (seeded) and make it the active, trainable one."""
    torch.manual_seed(seed)
    if isinstance(model, PeftModel):
        model.add_adapter(name, peft_config(settings))
        model.set_adapter(name)
        return model
    return get_peft_model(model, peft_config(settings), adapter_name=name)


def adapter_state(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """A snapshot of the adapter's weights under peft's canonical names (what save_pretrained writes): copies, since
    a float32 CPU tensor converted in place would stay the live weight that further training changes."""
    return {k: v.detach().to("cpu", torch.float32, copy=True)
            for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def load_adapter_state(model: PeftModel, name: str, state: dict[str, torch.Tensor]) -> None:
    """Put weights (e.g. the aggregated task adapter) into adapter `name`."""
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    # peft loads prompt-tuning embeddings separately but still lists them as unexpected
    unexpected = [k for k in result.unexpected_keys
                  if not (model.peft_config[name].is_prompt_learning and k == "prompt_embeddings")]
    if unexpected:
        raise ValueError(f"adapter {name!r}: unexpected weights {sorted(unexpected)[:3]}")


def trainable_parameters(model: PeftModel) -> tuple[int, float]:
    """(trainable parameters, their share of all parameters: the paper's Figure 7 x-axis)."""
    trainable, total = model.get_nb_trainable_parameters()
    return trainable, trainable / total


def atomic_save_adapter(model: PeftModel, name: str, target: Path) -> None:
    """peft save_pretrained of adapter `name` into `target`, replacing any older copy in one rename."""
    with atomic_directory(target, replace=True) as staging:
        saved = staging / ".peft"
        model.save_pretrained(saved, selected_adapters=[name])
        if (saved / name).is_dir():  # peft nests non-default adapter names one level down
            saved = saved / name
        for path in saved.glob("adapter_*"):
            path.rename(staging / path.name)
        shutil.rmtree(staging / ".peft")


TRAINING_RECORD = "oppu-adapter.json"  # written beside each personal adapter when it is trained


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (same run seed + user + variant -> same initialisation)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
