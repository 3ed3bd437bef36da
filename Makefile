# Set-up is part of every target: a fresh machine needs only Python 3.11, pip, gcc and node.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION = 20

.PHONY: demo test lint clean

LINT_PATHS := $(wildcard topx tests functions batch_jobs infra benchmarks)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/topx demo

test: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)

clean:
	rm -rf $(VENV) .venv-mxnet .venv-mxnet-build .venv-checkov .venv-checkov-build cdk.out .pytest_cache .ruff_cache
