# toposerve developer entry points. `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: all venv lint typecheck fmt test test-unit test-vllm crds verify demo demo-down clean

all: test

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

lint: venv
	$(BIN)/ruff check operator tests bench hack
	$(BIN)/ruff format --check operator tests bench hack
	$(BIN)/lint-imports   # .importlinter: the pure core imports no I/O layer

typecheck: venv
	$(BIN)/mypy

fmt: venv
	$(BIN)/ruff format operator tests bench hack
	$(BIN)/ruff check --fix operator tests bench hack

## Regenerate every generated file (CRDs); `verify` fails when the committed copies drift.
crds: venv
	$(BIN)/toposerve crd > crds/toposerve.io_llmdeployments.yaml
	cp crds/toposerve.io_llmdeployments.yaml charts/toposerve/crds/toposerve.io_llmdeployments.yaml

verify: crds
	git diff --exit-code -- crds charts/toposerve/crds

test-unit: venv
	$(BIN)/pytest -q tests/unit

# Cluster targets (cluster-bin, cluster-up, cluster-down, test-cluster) live in hack/cluster/cluster.mk.
include hack/cluster/cluster.mk

## Every rendered vLLM command line through the pinned vLLM's own parser (docs/vllm.md).
test-vllm: venv
	bash hack/vllm/venv.sh >/dev/null
	$(BIN)/pytest -q -m vllm tests/vllm

test: venv lint typecheck test-unit test-vllm test-cluster

demo: venv
	@bash hack/demo.sh

## Stop the demo's operator and the local cluster.
demo-down:
	-@test -f .cluster/operator.pid && kill $$(cat .cluster/operator.pid) 2>/dev/null; rm -f .cluster/operator.pid
	@$(MAKE) --no-print-directory cluster-down

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
