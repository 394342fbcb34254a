# Two commands do everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned CPU wheel keeps a fresh machine off the multi-GB CUDA build; GPU users run
# `make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"` (or keep their own).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
RUN_DIR ?= outputs/main

.PHONY: install train label test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

label: $(STAMP)
	$(BIN)/python label.py hydra.run.dir=$(RUN_DIR)/label

train: label

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf outputs multirun .cache
