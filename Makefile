# Two entry points for a fresh machine: `make run` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run sample test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch and torchvision first, pinned to the pair that lies on this disk (spandrel, the upscale-model
	# loader, needs torchvision; PyPI's own torchvision does not import beside the on-disk CPU torch 2.13)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
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
