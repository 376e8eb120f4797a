# Kiri: the two commands a newcomer needs are `make demo` and `make test`.
# Everything else here is a step they run; each is idempotent and quick when done.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.kiri-installed
PYTEST_ARGS ?=

.PHONY: help setup venv lock binaries debs test-servers lint typecheck test test-unit test-integration test-e2e demo \
        crds crds-check cluster-up cluster-down clean real-nodes-check setup-real-nodes test-real-nodes

help:
	@echo "make demo    run the Kiri demo on a local control plane"
	@echo "make test    install everything, lint, type check and run all tests"

## setup: Python packages into .venv, control-plane binaries from Go modules, Debian packages.
setup: venv binaries debs test-servers

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[all,dev]'
	@touch $(STAMP)

## lock: constraints.txt again from what .venv holds (after a deliberate upgrade there, tested).
lock: venv
	@{ sed -n '1,3p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^kiri=='; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt

binaries:
	@command -v go >/dev/null || { echo "make binaries: Go is required (https://go.dev/dl/)"; exit 1; }
	@bash hack/build-binaries.sh all

debs:
	@bash hack/install-debs.sh

test-servers:
	@bash hack/install-test-servers.sh

lint: venv
	$(VENV)/bin/ruff check operator runtime tests bench hack
	$(VENV)/bin/ruff format --check operator runtime tests bench hack
	$(PY) -m kiri_operator.api.generating --check
	$(PY) hack/helm_values_doc.py --check

## crds: regenerate crds/, helm/kiri/templates/crds/ and docs/api.md from the API models.
crds: venv
	$(PY) -m kiri_operator.api.generating
	$(PY) hack/helm_values_doc.py

crds-check: venv
	$(PY) -m kiri_operator.api.generating --check

typecheck: venv
	$(VENV)/bin/mypy operator/kiri_operator runtime/kiri_runtime

test-unit: venv
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-integration: setup
	$(PY) -m pytest tests/integration -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-e2e: setup
	$(PY) -m pytest tests/e2e -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

## Real nodes (hack/cluster up --real-nodes N; needs root): Debian tools, kubelet/containerd/runc/CoreDNS,
## Prometheus with Kubernetes discovery, Kiri's images. Part of `make test`; KIRI_REAL_NODES=0 leaves them out.
KIRI_REAL_NODES ?= 1
export KIRI_REAL_NODES
REAL_NODES_SETUP := $(if $(filter 0,$(KIRI_REAL_NODES)),,real-nodes-check setup-real-nodes)

# One clear line on a host that cannot run real nodes, before any build.
real-nodes-check: venv
	@$(PY) hack/cluster.py check-host

setup-real-nodes: real-nodes-check setup
	@bash hack/install-debs.sh --real-nodes
	@bash hack/build-binaries.sh real-nodes
	$(PY) hack/images.py build

test-real-nodes: setup-real-nodes
	$(PY) -m pytest tests/e2e -m real_nodes -q $(PYTEST_ARGS)

## test: the README's test command (the real-node e2e included).
# pytest exits 5 when it collects nothing; an empty selection is not a failure.
test: $(REAL_NODES_SETUP) setup lint typecheck
	$(PY) -m pytest tests -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

demo: setup
	@bash hack/demo.sh

cluster-up: setup
	@bash hack/cluster up

cluster-down:
	@bash hack/cluster down

clean: cluster-down
	rm -rf .kiri
