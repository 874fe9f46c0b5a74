"""Shared fixtures: the tiny random Llama (built once into the model cache) and its loaded copy."""

from __future__ import annotations

import signal

import pytest

import simulation  # noqa: F401  (first: Flower's telemetry off before any test imports flwr; simulation/__init__.py)
from client.model_build import resolve_model
from client.model_loading import load_base


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_child_processes():
    """Tests stop runs with SIGINT as a terminal's Ctrl-C would. A suite started as a background job of a
    non-interactive shell (`make test &`, some CI runners) inherits SIGINT ignored, and an ignored signal stays
    ignored across fork and exec, so every process a test starts would ignore Ctrl-C (Python then installs no
    KeyboardInterrupt). The suite restores the default handler for itself and so for its children."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The directory of the seeded 2-layer test model (built on first use, then cached)."""
    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny model as the process-wide shared base (load_base's cached copy)."""
    return load_base(tiny_model_dir, "cpu")
