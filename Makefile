# Two entry points for a fresh machine: `make run` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run sample test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so pip takes the CPU build that lies on disk instead of a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/zimage serve

sample: $(STAMP)
	$(BIN)/zimage generate "一个红色的圆形在蓝色背景上" -o outputs/sample.png

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_stages.py
	$(BIN)/python benchmarks/nano_speed.py
	$(BIN)/python benchmarks/workflow_overhead.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .mypy_cache .ruff_cache
