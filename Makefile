# Two commands matter: `make demo` and `make test`. Each sets itself up.
# `make e2e` runs the chart and agent on a real single-node cluster (root).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TOOLS := .tools/bin
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/$(TOOLS):$(PATH)

.PHONY: venv tools lint typecheck test demo proto bench chart-package

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

# The chart as a .tgz in $(CHART_DIST) (without ci/ scenarios and the icon's
# source, see chart/stc-npu/.helmignore), linted and installed with
# --dry-run=client from the package itself. Publishing: docs/operations.md.
CHART_DIST ?= dist/chart
chart-package: tools
	rm -rf $(CHART_DIST) && mkdir -p $(CHART_DIST)
	$(TOOLS)/helm3 package chart/stc-npu --destination $(CHART_DIST)
	@if tar -tzf $(CHART_DIST)/stc-npu-*.tgz | grep -E '^stc-npu/(ci/|icon\.svg)'; then \
	  echo "chart-package: the package holds test scaffolding" >&2; exit 1; fi
	$(TOOLS)/helm3 lint --strict $(CHART_DIST)/stc-npu-*.tgz
	$(TOOLS)/helm4 install stc-npu $(CHART_DIST)/stc-npu-*.tgz -n kube-system --dry-run=client >/dev/null
	@echo "chart-package: $$(ls $(CHART_DIST)/stc-npu-*.tgz) installs (helm 4 --dry-run=client)"

# A real single-node Kubernetes cluster (v1.36 and a standalone v1.23
# kubelet) around the chart and the agent: docs/e2e.md. Root; sets itself up.
.PHONY: e2e
e2e: venv tools
	$(PY) -m ci.e2e.run
