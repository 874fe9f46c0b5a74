"""Adapter similarity (paper appendix G) from node-local stores: exact cosines, summary, report files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from client.adapters import personal_adapter_name
from common.store import UserStore
from simulation.studies.similarity import adapter_similarity, write_similarity

A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # lora_A-like
B = torch.tensor([1.0, 0.0, 0.0])  # lora_B-like


def save_adapter(run_dir, user: str, state: dict[str, torch.Tensor], variant: str = "k0") -> None:
    folder = UserStore(run_dir, user).adapter(personal_adapter_name(user, variant))
    folder.mkdir(parents=True)
    save_file({name: t.contiguous() for name, t in state.items()}, folder / "adapter_model.safetensors")


@pytest.fixture
def run_dir(tmp_path):
    """Users: 'a', its copy 'same', its negation 'neg', and 'half' (same first tensor, orthogonal second)."""
    save_adapter(tmp_path, "a", {"x.lora_A.weight": A, "x.lora_B.weight": B})
    save_adapter(tmp_path, "same", {"x.lora_A.weight": A.clone(), "x.lora_B.weight": B.clone()})
    save_adapter(tmp_path, "neg", {"x.lora_A.weight": -A, "x.lora_B.weight": -B})
    save_adapter(tmp_path, "half", {"x.lora_A.weight": 2 * A, "x.lora_B.weight": torch.tensor([0.0, 5.0, 0.0])})
    UserStore(tmp_path, "trainer").root.mkdir(parents=True)  # a training node: no personal adapter
    save_adapter(tmp_path, "a", {"x.lora_A.weight": -A, "x.lora_B.weight": B}, variant="k1")  # another variant
    return tmp_path


def test_similarity_values_are_exact(run_dir):
    result = adapter_similarity(run_dir)
    assert result["users"] == ["a", "half", "neg", "same"]
    assert result["variant"] == "k0"
    m = {(u, v): result["matrix"][i][j] for i, u in enumerate(result["users"]) for j, v in enumerate(result["users"])}
    assert m["a", "same"] == pytest.approx(1.0, abs=1e-12)
    assert m["a", "neg"] == pytest.approx(-1.0, abs=1e-12)
    assert m["a", "half"] == pytest.approx(0.5, abs=1e-12)  # (cos 1 + cos 0) / 2: the mean over tensors
    assert m["neg", "half"] == pytest.approx(-0.5, abs=1e-12)
    assert all(m[u, u] == pytest.approx(1.0, abs=1e-12) for u in result["users"])
    assert all(m[u, v] == m[v, u] for u, v in m)


def test_summary_is_over_distinct_pairs(run_dir):
    summary = adapter_similarity(run_dir)["summary"]
    pairs = [0.5, -1.0, 1.0, -0.5, 0.5, -1.0]  # a-half, a-neg, a-same, half-neg, half-same, neg-same
    mean = sum(pairs) / len(pairs)
    assert summary["n_users"] == 4
    assert summary["mean_off_diagonal"] == pytest.approx(mean, abs=1e-12)
    assert summary["std"] == pytest.approx(math.sqrt(sum((p - mean) ** 2 for p in pairs) / len(pairs)), abs=1e-12)
    assert (summary["min"], summary["max"]) == (pytest.approx(-1.0), pytest.approx(1.0))


def test_write_similarity_writes_json_markdown_and_a_png(run_dir, tmp_path):
    out = tmp_path / "study"
    result = write_similarity(run_dir, out)
    assert json.loads((out / "similarity.json").read_text()) == result
    assert "| 4 | -0.0833 |" in (out / "similarity.md").read_text()
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["similarity.json", "similarity.md", "similarity.png"]


def test_missing_adapters_are_a_clear_error(run_dir, tmp_path):
    with pytest.raises(ValueError, match=r"variant 'k2' from at least two users, found 0"):
        adapter_similarity(run_dir, "k2")
    with pytest.raises(ValueError, match=r"variant 'k1' from at least two users, found 1"):
        adapter_similarity(run_dir, "k1")
    with pytest.raises(ValueError, match="found 0"):
        adapter_similarity(tmp_path / "empty")


def test_adapters_of_different_shapes_are_refused(run_dir):
    save_adapter(run_dir, "wide", {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": B})
    with pytest.raises(ValueError, match=r"'x.lora_A.weight' has different shapes across users"):
        adapter_similarity(run_dir)
