import os

# Triton kernels run on the CPU only through the interpreter; it must be on before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (`make test` runs `-n 2`), the cores are shared among the workers: each worker's torch
# gets its share of threads, and so do the processes it starts (spawned gloo ranks, CLI subprocesses inherit
# OMP_NUM_THREADS). The suite's models are tiny: more threads than cores only wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault(
        "OMP_NUM_THREADS",
        str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))),
    )
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import json
import random
from pathlib import Path

import pytest

from megatron_sep.config import config_from_dict

WORDS = (
    "the model reads a token and writes the next one while separators mark where each sentence "
    "ends so attention can keep them as summaries of what came before in the long text"
).split()


def make_corpus(path: Path, docs: int = 300, seed: int = 0) -> Path:
    """Synthetic English-like documents with punctuation and newlines."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            sentences = []
            for _ in range(rng.randint(2, 12)):
                words = rng.choices(WORDS, k=rng.randint(3, 14))
                words[0] = words[0].capitalize()
                if rng.random() < 0.4:
                    words.insert(rng.randint(1, len(words) - 1), words.pop() + ",")
                sentences.append(" ".join(words) + rng.choice(".?!;:"))
            text = " ".join(sentences)
            if rng.random() < 0.5:
                text = text.replace("; ", ";\n\t")
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """A tiny corpus, a sentencepiece tokenizer and its .bin/.idx, shared by the session."""
    from data_tools.preprocess import preprocess
    from data_tools.train_tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("corpus")
    jsonl = make_corpus(d / "corpus.jsonl")
    tok = train_sentencepiece([str(jsonl)], d / "sp", vocab_size=384)
    preprocess([str(jsonl)], tok, d / "text", workers=1, progress=False)
    return {"dir": d, "jsonl": jsonl, "tokenizer": tok, "prefix": str(d / "text")}


def tiny_config(corpus: dict, run_dir, **sections):
    raw = {
        "model": {
            "family": "llama",
            "num_layers": 2,
            "hidden_size": 32,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_position_embeddings": 64,
        },
        "data": {
            "tokenizer": str(corpus["tokenizer"]),
            "paths": [corpus["prefix"]],
            "seq_len": 32,
            "split": [0.9, 0.1, 0.0],
        },
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {
            "run_dir": str(run_dir),
            "steps": 8,
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "eval_interval": 4,
            "eval_iters": 2,
            "device": "cpu",
        },
        "checkpoint": {"save_interval": 4},
        "logging": {"log_interval": 1},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


# The slowest modules, slowest first (measured on 2 cores, one process: module fixtures included). Under
# `--dist loadfile` each worker takes the next whole module when it is free, so a long module collected last
# would run alone at the end; collected first, the short ones fill in beside it. Order within a module is kept.
# Modules are named by file name, whichever layer directory (unit/, integration/, compat/) holds them.
SLOW_MODULES_FIRST = (
    "test_parallel_training",
    "test_data_safety",
    "test_training",
    "test_fsdp2",
    "test_deepspeed",
    "test_trust",
    "test_sep_attention_op",
    "test_sep_attention_triton",
    "test_speculative",
    "test_hf_generation",
    "test_subllm",
    "test_dlcm_training",
    "test_sweep",
    "test_fp8",
    "test_tokenizer_preprocess",
    "test_distill",
    "test_context_parallel",
    "test_sep_cache",
    "test_probes",
    "test_eval_ranks",
    "test_bad_input_35",
)


# Each test is marked with its directory's layer (markers registered in pytest.ini): `-m unit`, `-m compat`, ...
LAYERS = ("unit", "integration", "compat")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        layer = item.path.resolve().parent
        if layer.parent == here and layer.name in LAYERS:
            item.add_marker(layer.name)
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    # stable: the rest keep their order
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
