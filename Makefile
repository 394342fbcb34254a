# Two commands do everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned CPU wheel keeps a fresh machine off the multi-GB CUDA build; GPU users run
# `make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"` (or keep their own).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
RUN_DIR ?= outputs/main
# model=minilm trains on the bundled backbone (no download); MODEL=scibert trains SciBERT from the Hub.
MODEL ?= minilm

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

# make train's recipe: the published one (conf/experiment/published.yaml), shortened to fit 15 minutes
# on 2 CPU cores: 1 epoch on a seeded sample of 3,000 of the 6,020 training papers plus the
# hand-labelled ones it missed, instead of 2 epochs on all; the classifier and the embedding labelling
# function read 128 tokens, not 256 (about half their time); the fastest precision this machine measures
# (training and sentence embeddings); 2,000 training papers scored for review.jsonl. `make train
# TRAIN_ARGS=` trains the full recipe.
TRAIN_ARGS ?= trainer.epochs=1 data.max_train_papers=3000 model.max_length=128 trainer.precision=auto \
	labeling.embedding.precision=auto labeling.embedding.max_length=128 export.review_pool=2000

# The main job: weak labels + fine-tuning + thresholds + export, then tag a few new abstracts.
train: $(STAMP)
	$(BIN)/python train.py experiment=published model=$(MODEL) $(TRAIN_ARGS) hydra.run.dir=$(RUN_DIR)
	$(BIN)/python predict.py checkpoint=$(RUN_DIR)/checkpoint input=data/examples.jsonl output=$(RUN_DIR)/examples.tags.jsonl
	@$(BIN)/python -c "import json,sys; [print(f\"{r['id']}: {', '.join(r['tags']) or '(no tag)'}\") for r in map(json.loads, open(sys.argv[1]))]" $(RUN_DIR)/examples.tags.jsonl

bench: $(STAMP)
	$(BIN)/python bench/scale_bench.py
	$(BIN)/python bench/baselines.py --run-dir $(RUN_DIR)
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/predict_vs_pipeline.py

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf outputs multirun .cache
