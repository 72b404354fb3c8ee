"""SepLLM inside the model and the trainer (CPU, reference backend)."""

import json

import pytest
import torch

from megatron_sep.config import config_from_dict
from megatron_sep.data.separators import resolve_separator_ids
from megatron_sep.data.tokenizer import load_tokenizer
from megatron_sep.model import build_model
from megatron_sep.model.attention import attention_stats, sep_inputs
from megatron_sep.training import Trainer

from ..conftest import tiny_config
from ..unit.test_sep_attention import oracle_mask


def build(kind, **attention):
    cfg = config_from_dict(
        {
            "model": {
                "family": "neox",
                "num_layers": 3,
                "hidden_size": 32,
                "num_heads": 4,
                "vocab_size": 50,
                "rotary_pct": 0.5,
                "max_position_embeddings": 64,
            },
            "attention": {
                "kind": kind,
                "separators": [3, 4, 5],
                "window": 4,
                "init_tokens": 2,
                **attention,
            },
            "data": {"seq_len": 64},
        }
    )
    return build_model(cfg).eval()


@pytest.mark.parametrize("kind", ["sepllm", "streamingllm", "fixed_interval"])
def test_future_tokens_never_change_the_past(kind):
    model = build(kind, hybrid="H", window=[4, 2, 64])
    tokens = torch.randint(0, 50, (2, 40))
    out = model(tokens)
    for t in (0, 17, 38):
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(0, 50, (2, 39 - t))
        torch.testing.assert_close(model(changed)[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-5)


def test_sepllm_differs_from_dense_and_window_covers_all_is_dense():
    torch.manual_seed(0)
    sep = build("sepllm")
    torch.manual_seed(0)
    dense = build("dense")
    torch.manual_seed(0)
    wide = build("sepllm", window=64)
    tokens = torch.randint(0, 50, (2, 40))
    assert (sep(tokens) - dense(tokens)).abs().max() > 1e-3
    torch.testing.assert_close(wide(tokens), dense(tokens), rtol=0, atol=1e-5)


def test_sep_inputs_kinds():
    tokens = torch.tensor([[3, 9, 4, 9, 9, 5, 9, 9]])
    assert sep_inputs(build("sepllm").cfg, tokens, torch.tensor([3, 4, 5]))["is_sep"].tolist() == [
        [True, False, True, False, False, True, False, False]
    ]
    assert not sep_inputs(build("streamingllm").cfg, tokens, torch.tensor([]))["is_sep"].any()
    fixed = sep_inputs(build("fixed_interval", fixed_interval=3).cfg, tokens, torch.tensor([]))[
        "is_sep"
    ]
    assert fixed.tolist() == [[False, False, True, False, False, True, False, False]]
    reset = sep_inputs(
        build("sepllm", reset_per_document=True, eod_id=9).cfg, tokens, torch.tensor([3])
    )
    assert reset["segment_ids"].tolist() == [
        [0, 0, 1, 1, 2, 3, 3, 4]
    ]  # EOD (9) ends its own document


def test_attention_stats_match_mask_counts():
    cfg = build("sepllm", window=[4, 6, 8]).cfg
    is_sep = torch.rand(3, 50) < 0.2
    stats = attention_stats(cfg, is_sep)
    pairs, kv = [], []
    for w in (4, 6, 8):
        m = oracle_mask(is_sep, 2, w)
        pairs.append((m.sum((1, 2)).double() / (50 * 51 / 2)).mean().item())
        kv.append((m[:, -1].sum(-1).double() / 50).mean().item())
    assert stats["kept_pairs"] == pytest.approx(sum(pairs) / 3, rel=1e-9)
    assert stats["kept_kv"] == pytest.approx(sum(kv) / 3, rel=1e-9)


def test_unresolved_separator_strings_rejected():
    with pytest.raises(ValueError, match="unresolved strings"):
        build("sepllm", separators=[".", 4])


def test_resolution_warns_for_multi_token_strings(corpus):
    tok = load_tokenizer(corpus["tokenizer"])
    ids, warnings = resolve_separator_ids(tok, [".", "zebra crossing"])
    assert (
        len(ids) == 1
        and len(warnings) == 1
        and "'zebra crossing' is not a single token" in warnings[0]
    )


def test_sepllm_trains_on_cpu_and_logs_stats(corpus, tmp_path, capsys):
    cfg = tiny_config(
        corpus,
        tmp_path / "run",
        attention={"kind": "sepllm", "window": 8, "stats_interval": 5},
        train={"steps": 20, "eval_interval": 10},
    )
    trainer = Trainer(cfg)
    trainer.run()
    out = capsys.readouterr().out
    assert "separator ids: " in out and "separator share in the data" in out
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    stats = [r for r in rows if "kept_pairs" in r]
    assert [r["step"] for r in stats] == [5, 10, 15, 20]
    assert all(0 < r["kept_pairs"] < 1 and 0 < r["kept_kv"] < 1 for r in stats)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < vals[0]
    # resolved, saved in config.yaml
    assert all(isinstance(x, int) for x in trainer.cfg.attention.separators)
    # the caller's: as given
    assert cfg.attention.separators == tiny_config(corpus, tmp_path).attention.separators
    assert "separators:\n  - " in (tmp_path / "run" / "config.yaml").read_text()
