"""Base models of other architectures than the bundled Llamas, as users bring them (`--model DIR`): tiny random
ones built from their configs with SmolLM2's tokenizer, read through the same code as any local model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import (
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from client.adapters import attach_fresh, peft_config, trainable_parameters
from client.model_build import linear_module_names, model_type
from client.model_loading import load_base, load_fresh, load_weightless
from client.task_adapter import initial_task_state, task_lora
from common.config import PeftSettings, RunConfig
from simulation.cli import main
from simulation.privacy_audit import main as audit_main

SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def _models(vocab: int) -> dict[str, PreTrainedModel]:
    return {
        "qwen2": Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **SIZE)),
        "gemma2": Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, head_dim=16, **SIZE)),
        "phi3": Phi3ForCausalLM(Phi3Config(vocab_size=vocab, pad_token_id=None, **SIZE)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4)),  # Conv1D layers
    }


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """{architecture: directory} of seeded tiny models whose tokenizer has no pad token (as Llama-3's)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    root = tmp_path_factory.mktemp("architectures")
    torch.manual_seed(0)
    dirs: dict[str, Path] = {}
    for name, model in _models(len(tokenizer)).items():
        model.config.eos_token_id = tokenizer.eos_token_id
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def base_dirs(model_dirs: dict[str, Path], tiny_model_dir: Path) -> dict[str, Path]:
    """The architectures' directories and the bundled tiny Llama's, by name."""
    return {"tiny-random": tiny_model_dir, **model_dirs}


def test_lora_targets_name_each_architectures_own_layers(model_dirs, tmp_path):
    assert {"q_proj", "v_proj", "down_proj"} <= set(linear_module_names(str(model_dirs["qwen2"]), tmp_path))
    assert {"qkv_proj", "gate_up_proj"} <= set(linear_module_names(str(model_dirs["phi3"]), tmp_path))
    # GPT-2's projections are transformers' Conv1D, which peft's LoRA adapts as well
    assert set(linear_module_names(str(model_dirs["gpt2"]), tmp_path)) == {"c_attn", "c_proj", "c_fc"}
    assert model_type(str(model_dirs["gemma2"]), tmp_path) == "gemma2" and model_type("tiny-random") == "llama"


def test_a_model_without_fused_attention_loads_in_float32(model_dirs):
    """fp32 on a CPU takes transformers' default attention: sdpa where the architecture has it, eager where not
    (asking for sdpa by name refused Gemma-2)."""
    gemma, _ = load_base(model_dirs["gemma2"], "cpu", "float32")
    qwen, tokenizer = load_base(model_dirs["qwen2"], "cpu", "float32")
    assert gemma.config._attn_implementation == "eager" and qwen.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # none in the tokenizer: EOS pads


@pytest.mark.parametrize(("name", "scaled_layers"), [
    ("tiny-random", {"k_proj", "v_proj", "down_proj"}),  # the bundled Llamas' layers, as before peft chose them
    ("qwen2", {"q_proj", "v_proj", "down_proj"}),
    ("gpt2", {"c_attn", "c_proj"}),
])
def test_ia3_scales_the_layers_peft_knows_for_the_architecture(base_dirs, name, scaled_layers):
    model, _ = load_base(base_dirs[name], "cpu", "float32")
    wrapped = get_peft_model(model, peft_config(PeftSettings(kind="ia3")), adapter_name="probe")
    scaled = {n.split(".ia3_l.")[0].rsplit(".", 1)[-1] for n, _ in wrapped.named_parameters() if ".ia3_l." in n}
    wrapped.unload()
    assert scaled == scaled_layers


@pytest.mark.parametrize(("name", "targets"), [
    ("tiny-random", "q_proj,v_proj"), ("qwen2", "q_proj,v_proj"), ("gemma2", "q_proj,v_proj"), ("phi3", "qkv_proj"),
    ("gpt2", "c_attn"),
])
def test_the_servers_weightless_base_seeds_the_same_task_lora_as_the_loaded_one(base_dirs, name, targets):
    """The server starts FedAvg from a task LoRA made on stand-ins for the weights: the same tensors, bit for bit,
    as on the loaded base, and the same trainable share (tied embeddings counted once)."""
    model_dir = base_dirs[name]
    cfg = RunConfig(model=str(model_dir), lora_targets=targets)
    weightless, loaded = initial_task_state(load_weightless(model_dir), cfg), initial_task_state(
        load_fresh(model_dir, "cpu", "float32"), cfg)
    assert weightless.keys() == loaded.keys() and len(loaded) == 2 * SIZE["num_hidden_layers"] * len(targets.split(","))
    assert all(torch.equal(weightless[k], loaded[k]) for k in loaded)
    assert any(v.abs().sum() > 0 for v in loaded.values())  # (seeded lora_A: not all zero)
    sizes = [trainable_parameters(attach_fresh(model, task_lora(cfg), "size", 0))
             for model in (load_weightless(model_dir), load_fresh(model_dir, "cpu", "float32"))]
    assert sizes[0] == sizes[1]


def test_an_8b_base_is_weightless_from_its_config_alone(tmp_path):
    """A Llama-3-8B-shaped config without any weight file: 8.03e9 parameters held in a few bytes each, and its task
    LoRA made from them (the server no longer reads 32 GB of float32 to start FedAvg)."""
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path)
    model = load_weightless(tmp_path)
    parameters = list(model.parameters())
    assert round(sum(p.numel() for p in parameters) / 1e9, 2) == 8.03
    assert sum(p.untyped_storage().nbytes() for p in parameters) < 4096
    state = initial_task_state(model, RunConfig(model=str(tmp_path)))
    # rank 8 on q_proj (4096 -> 4096) and v_proj (4096 -> 1024) of 32 layers
    assert sum(v.numel() for v in state.values()) == 32 * 8 * (4096 + 4096 + 4096 + 1024)


def _run(argv: list[str], run_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["--task", "LaMP-2M", "--data", "synthetic", "--num-clients", "2", "--train-clients", "2",
                   "--rounds", "1", "--max-history", "6", "--task-history", "6", "--run-dir", str(run_dir), *argv])
    return status, capsys.readouterr().err


def test_a_gpt2_base_runs_end_to_end_and_passes_the_audit(model_dirs, tmp_path, capsys, monkeypatch):
    """The architecture least like Llama (Conv1D projections, learned positions, no pad token): task adaptation,
    personal adapters and the profile's generation run on it, and every user is evaluated."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("OPPU_CACHE_DIR", str(tmp_path / "cache"))  # (a run sets it for its workers: undone after)
    status, err = _run(["--model", str(model_dirs["gpt2"]), "--lora-targets", "c_attn", "--methods", "base,pag,oppu"],
                       run_dir, capsys)
    assert status == 0, err
    report = json.loads((run_dir / "report.json").read_text())
    assert report["users"]["evaluated"] == 2 and not report["errors"]
    assert {m: r["queries"] for m, r in report["methods"].items()} == {"base": 8, "pag": 8, "oppu": 8}  # 4 queries a user
    assert report["task_adaptation"]["sampled_updates"] == {"1": 2}
    assert audit_main([str(run_dir)]) == 0


@pytest.mark.parametrize("case", ["phi3 with Llama's targets", "phi3 with ia3", "gpt2 with Llama's targets"])
def test_what_an_architecture_lacks_is_refused_in_one_line(model_dirs, tmp_path, capsys, case):
    argv, message = {
        "phi3 with Llama's targets": (["--model", str(model_dirs["phi3"])],
                                      "q_proj, v_proj names no linear layer of --model"),
        "phi3 with ia3": (["--model", str(model_dirs["phi3"]), "--lora-targets", "qkv_proj", "--peft", "ia3"],
                          "--peft ia3: peft does not know which layers of a phi3 model"),
        "gpt2 with Llama's targets": (["--model", str(model_dirs["gpt2"])], "expected names from c_attn, c_proj, c_fc"),
    }[case]
    status, err = _run([*argv, "--cache-dir", str(tmp_path / "cache")], tmp_path / "run", capsys)
    assert status == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
