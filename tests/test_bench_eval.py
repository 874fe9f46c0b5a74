"""The evaluation-throughput benchmark runs end to end on the tiny model and reports sane figures."""

from __future__ import annotations

import json

import torch

from bench.eval_throughput import REFERENCE_MAX_NEW_TOKENS, main
from client.device import pick_dtype


def test_eval_throughput_reports_both_ways(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    results = main(["--model", "tiny-random", "--prompts", "4", "--generation-prompts", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    assert results["classification"]["prompts"] == 4
    assert results["dtype"] == str(pick_dtype(torch.device("cpu"))).removeprefix("torch.")  # as a run computes
    assert results["generation"]["prompts"] == 2
    assert results["classification"]["ours"]["valid_share"] == 1.0  # label scoring always returns a label
    assert results["classification"]["ours"]["new_tokens"] == 0
    assert 0.0 <= results["classification"]["reference"]["valid_share"] <= 1.0
    for workload in ("classification", "generation"):
        r = results[workload]
        prompts = r["prompts"]
        # every reference prompt samples at least one token and stops at 200
        assert prompts <= r["reference"]["new_tokens"] <= prompts * REFERENCE_MAX_NEW_TOKENS
        assert 1 <= r["reference"]["max_new_tokens"] <= REFERENCE_MAX_NEW_TOKENS
        assert isinstance(r["speedup"], float) and r["speedup"] > 0
        for way in ("ours", "reference"):
            assert r[way]["seconds"] > 0 and r[way]["prompts_per_s"] > 0
    assert 1 <= results["generation"]["ours"]["new_tokens"] <= 2 * 32
