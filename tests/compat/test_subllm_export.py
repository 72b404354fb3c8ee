"""SUBLLM exported to transformers (modeling_subllm.py, remote code): the same logits as the project model."""

import pytest
import torch

from megatron_sep.config import config_from_dict, dump_config
from megatron_sep.convert import export_hf
from megatron_sep.convert.hf import ConversionError
from megatron_sep.model import build_model
from megatron_sep.checkpoint import WeightsOnly, save_checkpoint


def _save(tmp_path, attention=None):
    cfg = config_from_dict(
        {
            "model": {
                "num_layers": 5,
                "hidden_size": 64,
                "num_heads": 4,
                "num_kv_heads": 2,
                "vocab_size": 200,
                "max_position_embeddings": 64,
                "structure": "T(T(T)T)T",
                "subsample_keep": 0.5,
            },
            "attention": attention or {"kind": "dense"},
            "data": {"seq_len": 32, "mock": True},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for d in model.down:
            d.score.weight.normal_(std=3.0)  # about half the tokens kept at each level
        for b in model.bypass:
            b.scale.uniform_(0.2, 1.0)
    save_checkpoint(
        tmp_path / "run" / "checkpoints",
        1,
        WeightsOnly(model, cfg),
        {"consumed_samples": 0},
        dump_config(cfg),
        keep_last=1,
    )
    return model


def test_transformers_gives_the_project_models_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = _save(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export_hf(tmp_path / "run", tmp_path / "hf"), trust_remote_code=True
    ).eval()
    tokens = torch.randint(0, 200, (3, 24))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4
        greedy = hf.generate(tokens[:1, :8], max_new_tokens=6, do_sample=False)
        # each new token is the argmax after the ones before it
        mine = ours(greedy)[:, 7:-1].argmax(-1)
    assert torch.equal(greedy[:, 8:], mine)


def test_sepllm_or_neox_subllm_is_refused_with_the_reason(tmp_path):
    _save(tmp_path, {"kind": "sepllm", "window": 4, "separators": [3, 4]})
    with pytest.raises(ConversionError, match="llama family with dense attention only"):
        export_hf(tmp_path / "run", tmp_path / "hf")
