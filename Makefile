# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO := data/demo

.PHONY: demo test env clean-demo

env: $(BIN)/megatron-sep

$(BIN)/megatron-sep: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]" "$(TORCH)"
	touch $@

$(DEMO)/corpus.jsonl: | $(BIN)/megatron-sep
	$(BIN)/megatron-sep demo-corpus --out $@

$(DEMO)/tokenizer.model: $(DEMO)/corpus.jsonl
	$(BIN)/megatron-sep tokenizer train --input $< --out $(DEMO)/tokenizer --vocab-size 4096

$(DEMO)/corpus_text_document.idx: $(DEMO)/corpus.jsonl $(DEMO)/tokenizer.model
	$(BIN)/megatron-sep preprocess --input $< --tokenizer $(DEMO)/tokenizer.model --out $(DEMO)/corpus_text_document

demo: $(DEMO)/corpus_text_document.idx
	$(BIN)/megatron-sep train --config configs/tiny_cpu.yaml

test: env
	$(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf $(DEMO) runs/demo
