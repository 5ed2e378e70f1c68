# Two entry points for a fresh machine: `make run` and `make test`. Both create .venv from the lock file
# (requirements.lock: every package pinned with its hashes) and reuse it until the lock changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The lock is resolved for CPython 3.11 on Linux x86_64; elsewhere, install the ranges of pyproject.toml.
LOCKED_FOR := sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64"
PYTEST_ARGS ?=

.PHONY: run sample test coverage lint docs lock bench clean

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import platform, sys; sys.exit(0 if $(LOCKED_FOR) else 1)' || { \
	  echo "requirements.lock is for CPython 3.11 on Linux x86_64; this is $$($(PYTHON) -V) on $$(uname -sm)."; \
	  echo "Use PYTHON=python3.11, or install without the lock: python -m venv .venv && .venv/bin/pip install -e '.[dev,docs]'"; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --require-hashes -r requirements.lock
	$(BIN)/python -m pip install -qq --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/zimage serve

sample: $(STAMP)
	$(BIN)/zimage generate "一个红色的圆形在蓝色背景上" -o outputs/sample.png

test: $(STAMP)
	tools/system_packages.sh
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)

# The suite under coverage, subprocesses included (pyproject.toml's [tool.coverage]); a report per file.
coverage: $(STAMP)
	tools/system_packages.sh
	rm -rf test-artifacts/coverage && mkdir -p test-artifacts/coverage
	$(BIN)/coverage run -m pytest $(PYTEST_ARGS)
	$(BIN)/coverage combine -q
	$(BIN)/coverage report --sort=cover

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/mkdocs serve

# Re-resolve after a change to pyproject.toml's dependencies, keeping every other pin; `make lock
# UPGRADE=1` moves every package to its newest release that fits. The suite fails while they disagree.
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --all-extras --all-build-deps --strip-extras \
	  --no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) -c constraints.txt \
	  -o requirements.lock pyproject.toml

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_stages.py
	$(BIN)/python benchmarks/nano_speed.py
	$(BIN)/python benchmarks/workflow_overhead.py

clean:
	rm -rf $(VENV) outputs site .pytest_cache .mypy_cache .ruff_cache
