"""The run config has one set of defaults: RunConfig's, mirrored in pyproject's [tool.flwr.app.config]."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from client.config import RunConfig
from simulation.partition import RUN_KEYS, split_run_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_config_matches_runconfig_defaults() -> None:
    flwr_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    method_config = {k: v for k, v in flwr_config.items() if k not in RUN_KEYS}
    assert method_config == RunConfig().to_record()
    cfg, num_test, num_train, run_dir = split_run_config(flwr_config)
    assert (cfg, num_test, num_train, run_dir.name) == (RunConfig(), 100, 20, "flwr-run")


def test_from_record_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match=r"unknown config keys \['lora-rank'\]"):
        RunConfig.from_record({"lora-rank": 4})
    with pytest.raises(ValueError, match="fraction-train must be in"):
        RunConfig(fraction_train=0.0)
    with pytest.raises(ValueError, match="peft kind 'adapterx'"):
        RunConfig(peft="adapterx")
    with pytest.raises(ValueError, match="dtype must be auto, float32 or bfloat16; got 'fp16'"):
        RunConfig(dtype="fp16")
    assert RunConfig.from_record({"k": 2, "methods": "rag,oppu+rag"}).method_names() == ["rag-k2", "oppu+rag-k2"]
