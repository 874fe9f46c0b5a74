"""Shared fixtures: the tiny random Llama (built once into the model cache) and its loaded copy."""

from __future__ import annotations

import pytest

from client.model_build import resolve_model
from client.model_cache import load_base


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The directory of the seeded 2-layer test model (built on first use, then cached)."""
    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny model as the process-wide shared base (load_base's cached copy)."""
    return load_base(tiny_model_dir, "cpu")
