# Two commands matter: `make demo` and `make test`. Each sets itself up.
# `make e2e` runs the chart and agent on a real single-node cluster (root).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TOOLS := .tools/bin
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/$(TOOLS):$(PATH)

.PHONY: venv tools lint typecheck test demo proto bench

$(VENV)/.installed: requirements-dev.txt agent/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -e ./agent
	touch $@

venv: $(VENV)/.installed

# helm 3 and helm 4, official binaries, checksums pinned in the script.
tools:
	bash ci/install-helm.sh $(TOOLS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

# Regenerate the committed gRPC modules after editing api.proto.
proto: venv
	PYTHON=$(PY) bash ci/gen-proto.sh

test: venv tools lint typecheck
	$(PY) -m pytest

demo: venv
	$(PY) ci/demo.py

# Speed and footprint of the real agent (figures in bench/README.md).
bench: venv
	$(PY) bench/run.py

# The long soak (200+ kubelet restarts, leak counts); make test skips it.
.PHONY: soak
soak: venv
	$(PY) -m pytest -m slow -s tests/reliability

# A real single-node Kubernetes cluster (v1.36 and a standalone v1.23
# kubelet) around the chart and the agent: docs/e2e.md. Root; sets itself up.
.PHONY: e2e
e2e: venv tools
	$(PY) -m ci.e2e.run
