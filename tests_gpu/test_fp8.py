"""train.precision: fp8 through the Trainer on the GPU: compiled blocks with torchao float8 linears, the
loss against a bf16 run of the same seed and batches, and checkpoints that a bf16 run resumes and
export-hf writes. (tests/integration/test_fp8.py checks the conversion and the tensor-parallel wiring on CPU.)"""

import json
import os

# tests.conftest turns the CPU interpreter on for tests/
os.environ.setdefault("TRITON_INTERPRET", "0")
import pytest
import torch

from megatron_sep.config import config_from_dict
from megatron_sep.convert.commands import export_hf
from megatron_sep.checkpoint import load_model
from megatron_sep.convert.hf import read_hf_weights
from megatron_sep.training import Trainer
from tests.conftest import make_corpus

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    raise RuntimeError(
        "tests_gpu/test_fp8.py needs a GPU with float8 tensor cores (H100, H200, L40S)"
    )
# the GPU machines carry no torchao unless a wheel is brought: skip, as for an optional extra
pytest.importorskip(
    "torchao.float8",
    reason="torchao is not installed (pip install -e '.[fp8]')",
    exc_type=ImportError,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_tools.preprocess import preprocess
    from data_tools.train_tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("corpus")
    jsonl = make_corpus(d / "corpus.jsonl", docs=2000)
    tok = train_sentencepiece([str(jsonl)], d / "sp", vocab_size=512)
    preprocess([str(jsonl)], tok, d / "text", workers=1, progress=False)
    return {"tokenizer": str(tok), "prefix": str(d / "text")}


def config(corpus, run_dir, precision, steps):
    return config_from_dict(
        {
            "model": {
                "family": "llama",
                "num_layers": 2,
                "hidden_size": 256,
                "num_heads": 4,
                "ffn_hidden_size": 512,
                "max_position_embeddings": 256,
            },
            "data": {
                "tokenizer": corpus["tokenizer"],
                "paths": [corpus["prefix"]],
                "seq_len": 256,
                "split": [0.95, 0.05, 0.0],
            },
            "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 5},
            "train": {
                "run_dir": str(run_dir),
                "steps": steps,
                "micro_batch_size": 8,
                "eval_interval": 40,
                "eval_iters": 2,
                "compile": True,
                "precision": precision,
                "device": "cuda",
            },
            "checkpoint": {"save_interval": 40},
            "logging": {"log_interval": 1},
        }
    )


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in r]


def test_fp8_trains_like_bf16_and_its_checkpoints_load_in_bf16(corpus, tmp_path):
    runs = {}
    for precision in ("bf16", "fp8"):
        trainer = Trainer(config(corpus, tmp_path / precision, precision, 40), log=True)
        f8 = [n for n, m in trainer.model.named_modules() if type(m).__name__ == "Float8Linear"]
        assert len(f8) == (10 if precision == "fp8" else 0)
        assert ("fp8" in trainer.peak_source) == (precision == "fp8")
        trainer.run()
        runs[precision] = losses(tmp_path / precision)
    b, f = runs["bf16"], runs["fp8"]
    assert b[-1] < 0.6 * b[0]  # it learned
    # same weights and batches: the mean of the last 10 losses within 3% (fp8's e4m3 rounding, ~6% per
    # product, averages out over the matmul sums and the 2048 tokens of a step)
    tail_b, tail_f = sum(b[-10:]) / 10, sum(f[-10:]) / 10
    assert abs(tail_f - tail_b) / tail_b < 0.03, (tail_b, tail_f)

    # the fp8 run's checkpoint resumes in a bf16 run (same parameter names, fp32 masters) ...
    resumed = Trainer(config(corpus, tmp_path / "fp8", "bf16", 45), log=True)
    assert resumed.run()["step"] == 45
    assert len(losses(tmp_path / "fp8")) == 45
    # ... and exports to Hugging Face with the weights it holds
    out = export_hf(tmp_path / "fp8", tmp_path / "hf")
    model, _ = load_model(tmp_path / "fp8")
    hf = read_hf_weights(out)
    assert torch.equal(
        hf["model.layers.0.mlp.gate_proj.weight"], model.layers[0].mlp.gate.weight.detach()
    )
