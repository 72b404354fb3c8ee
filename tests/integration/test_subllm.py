"""SUBLLM (model.structure): parsing, the plain-model limit, the scorer's gradients and balancer, causality
of the causal variant, training with resume, and tensor parallelism against one process (fp32)."""

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_sep.config import ConfigError, config_from_dict
from megatron_sep.model import build_model
from megatron_sep.model.subllm import _Balance
from megatron_sep.training import Trainer

from ..conftest import tiny_config
from ..dist_utils import run_distributed, train_layouts

STRUCT = {"num_layers": 4, "structure": "T(TT)T", "subsample_keep": 0.5}


def model_config(**model):
    return config_from_dict(
        {
            "model": {
                "num_layers": 4,
                "hidden_size": 32,
                "num_heads": 4,
                "vocab_size": 97,
                "max_position_embeddings": 64,
                **model,
            },
            "data": {"seq_len": 32},
        }
    )


@pytest.mark.parametrize(
    "structure,layers,words",
    [
        ("TT(TT", 4, "open"),
        ("T)T(TT", 4, "never opened"),
        ("TX(TT)", 4, "only T"),
        ("TT()TT", 4, "empty level"),
        ("T(TT)T", 5, "4 blocks"),
        ("T(T(T)T)", 4, "one keep ratio per ("),
    ],
)
def test_structure_errors_name_the_problem(structure, layers, words):
    keep = [0.5] if words == "one keep ratio per (" else 0.5
    with pytest.raises(ConfigError, match="model.(structure|subsample_keep).*Fix:") as e:
        model_config(num_layers=layers, structure=structure, subsample_keep=keep)
    assert words in str(e.value)


def test_bad_layouts_for_subsampling_are_rejected(corpus, tmp_path):
    with pytest.raises(ConfigError, match="parallel.cp"):
        tiny_config(corpus, tmp_path, model=STRUCT, parallel={"cp": 2})
    from megatron_sep.parallel.context import resolve_layout

    # T(TT)T: stages start at 0, 1, 3
    cfg = tiny_config(corpus, tmp_path, model=STRUCT, parallel={"pp": 4})
    with pytest.raises(
        ConfigError, match="parallel.pp=4: cannot split model.structure='T\\(TT\\)T' into 4"
    ):
        resolve_layout(cfg, 4)


@pytest.mark.parametrize(
    "structure,layers", [("T(T)", 2), ("(T)", 1), ("TT(TT)", 4), ("T(T(T)T)", 4)]
)
def test_structures_that_end_inside_or_after_a_level_train(corpus, tmp_path, structure, layers):
    """A structure ending with `)` (a crash in the stage split once) trains, one cut per block."""
    from megatron_sep.config.structure import cuts, parse_structure

    assert len(cuts(parse_structure(structure, layers))) == layers
    cfg = tiny_config(
        corpus,
        tmp_path,
        model={"num_layers": layers, "structure": structure, "subsample_keep": 0.5},
        train={"steps": 1, "eval_interval": 1},
        checkpoint={"save_interval": 1},
    )
    assert math.isfinite(Trainer(cfg, log=False).run()["loss"])


def test_keep_ratio_one_is_the_plain_model():
    torch.manual_seed(0)
    plain = build_model(model_config())
    torch.manual_seed(0)
    sub = build_model(model_config(structure="T(TT)T", subsample_keep=1.0))
    tokens = torch.randint(0, 97, (2, 32))
    assert torch.equal(plain(tokens), sub(tokens))


def test_mfu_flops_count_each_block_at_its_level_share():
    from megatron_sep.config.structure import block_shares, parse_structure
    from megatron_sep.training.metrics import flops_per_token, matmul_params

    assert block_shares(parse_structure("T(T(T)T)T", 5), [0.5, 0.4]) == [1.0, 0.5, 0.2, 0.5, 1.0]
    dense, sub = model_config(), model_config(structure="TT(T)T", subsample_keep=0.5)
    n = matmul_params(build_model(dense))
    per_block = (n - build_model(dense).lm_head.weight.numel()) / 4
    attention = 12.0 * dense.model.hidden_size * dense.data.seq_len
    # one of four blocks runs half the tokens: half its matmuls, a quarter of its attention per token
    assert flops_per_token(sub, n) == pytest.approx(
        flops_per_token(dense, n) - 6 * per_block / 2 - attention * 0.75
    )


def test_scorer_gets_finite_gradients_and_dropped_tokens_skip_the_inner_blocks():
    torch.manual_seed(0)
    model = build_model(model_config(**STRUCT))
    tokens = torch.randint(0, 97, (2, 32))
    model(tokens, tokens).backward()
    for p in (model.down[0].score.weight, model.bypass[0].scale):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # a dropped token's stream passes the level unchanged: its output at ) is its input at (
    seen = {}
    model.down[0].register_forward_hook(lambda m, i, o: seen.update(x=i[0], sel=o))
    model.bypass[0].register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        model(tokens)
    kept = torch.zeros(2, 32, dtype=torch.bool).scatter(1, seen["sel"].index, seen["sel"].valid)
    assert kept.sum(1).tolist() == [16, 16]  # top-k of 0.5 x 32
    assert torch.equal(seen["out"][~kept], seen["x"][~kept])


def test_balancer_moves_the_share_of_positive_scores_toward_keep():
    """SGD on scores under gradient noise alone, with and without the balancer: only the balanced ones
    move toward `keep` of them positive."""

    def share_after(balanced: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        x = (torch.randn(4, 256) - 2.0).requires_grad_(True)  # ~3% positive; keep 0.5 wants ~50%
        for _ in range(200):
            y = _Balance.apply(x, 0.5) if balanced else x * 1.0
            y.backward(torch.randn_like(y) * 0.1)  # noise from the loss: no direction of its own
            with torch.no_grad():
                x -= 0.5 * x.grad
            x.grad = None
        return x.mean().item(), (x > 0).float().mean().item()

    (plain_mean, plain), (balanced_mean, balanced) = share_after(False), share_after(True)
    # seen: mean -1.93 and 6% positive without, -1.75 and 12% with (the balancer's push is 0.04 x |grad|)
    assert balanced_mean - plain_mean > 0.1 and balanced > 1.5 * plain, (
        plain_mean,
        plain,
        balanced_mean,
        balanced,
    )


def test_causal_variant_outputs_do_not_see_later_tokens():
    """subsample_causal keeps positive scores: what position t gets cannot depend on tokens after t."""
    torch.manual_seed(0)
    model = build_model(model_config(**STRUCT, subsample_causal=True)).train()
    with torch.no_grad():  # scores around zero: about half kept
        model.down[0].score.weight.normal_(std=3.0)
    a = torch.randint(0, 97, (2, 32))
    b = a.clone()
    b[:, 20:] = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        la, lb = model(a), model(b)
    # not bitwise: the level's length differs, and on some CPUs the GEMM kernel (so fp32 rounding, ~1e-8 here)
    # changes with it; a leak of a later token moves these logits by ~0.1, as it does after position 20
    torch.testing.assert_close(la[:, :20], lb[:, :20], atol=1e-6, rtol=0)
    assert (la[:, 20:] - lb[:, 20:]).abs().max() > 1e-2


def _config(corpus, run_dir, parallel=None):
    # keep 0.52: 17 of 32 tokens, an odd count, so sequence parallelism pads the level for two shards
    return tiny_config(
        corpus,
        run_dir,
        model={**STRUCT, "subsample_keep": 0.52},
        parallel=parallel or {},
        attention={"kind": "sepllm", "window": 6, "init_tokens": 2},
        train={"steps": 6, "micro_batch_size": 2, "global_batch_size": 4, "eval_interval": 3},
        checkpoint={"save_interval": 3},
    )


def losses(run_dir):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


LAYOUTS = {
    "tp2": {"tp": 2},
    "tp2_sp": {"tp": 2, "sequence_parallel": True},
    "pp2": {"pp": 2},
    "dp2_zero1": {"zero": 1},
    "dp2_deepspeed_zero3": {"engine": "deepspeed", "zero": 3},
}  # the last: with DeepSpeed installed
try:
    import deepspeed  # noqa: F401
except ImportError:
    LAYOUTS.pop("dp2_deepspeed_zero3")


def test_trains_resumes_and_matches_under_parallel_layouts(corpus, tmp_path):
    """SepLLM attention inside the levels. A stop at step 3 and a resume give the uninterrupted losses;
    tp2 (scorer and bypass replicated, identical selections), tp2 with sequence parallelism (the level
    gathers the shards, selects on the whole sequence and pads 17 kept tokens to 18 for two shards), pp2 (T | (TT)T: the level in stage 1),
    dp2 with ZeRO-1 and DeepSpeed ZeRO-3 on dp2 match one process within 1e-5 (fp32; only the order of
    sums differs)."""
    Trainer(_config(corpus, tmp_path / "ref")).run()
    Trainer(_config(corpus, tmp_path / "resumed")).run(until=3)
    Trainer(_config(corpus, tmp_path / "resumed")).run()
    run_distributed(train_layouts, 2, _config, corpus, str(tmp_path), LAYOUTS)
    ref = losses(tmp_path / "ref")
    assert sorted(ref) == list(range(1, 7)) and ref[6] < ref[1]
    for name in ("resumed", *LAYOUTS):
        got = losses(tmp_path / name)
        assert all(abs(got[s] - ref[s]) < 1e-5 for s in ref), (name, got, ref)


@pytest.mark.parametrize("kind", ["dense", "sepllm"])
def test_incremental_generation_equals_full_recomputation(kind):
    """Eval mode keeps the positive scores (causal). Decoding through the KV cache, one token at a time and
    with the prompt in chunks, gives the logits of one full forward over the final tokens; the blocks of a
    level only cache the tokens it kept."""
    from megatron_sep.inference import DecodeOptions
    from megatron_sep.inference.generate import generate, make_cache

    attention = (
        {"kind": "sepllm", "window": 3, "init_tokens": 2, "separators": [5, 6, 7, 8, 9]}
        if kind == "sepllm"
        else {"kind": "dense"}
    )
    cfg = config_from_dict(
        {
            "model": {
                "num_layers": 5,
                "hidden_size": 32,
                "num_heads": 4,
                "vocab_size": 97,
                "max_position_embeddings": 64,
                "structure": "T(T(T)T)T",
                "subsample_keep": 0.5,
            },
            "attention": attention,
            "data": {"seq_len": 32},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for d in model.down:
            d.score.weight.normal_(std=3.0)  # about half the tokens kept at each level
    prompt = torch.randint(0, 20, (2, 9))
    for chunk in (0, 4):
        tokens, steps = generate(
            model, prompt, 8, DecodeOptions(prefill_chunk=chunk), output_logits=True
        )
        with torch.no_grad():
            full = model(tokens)[:, prompt.shape[1] - 1 : -1].float()
        assert (full - steps).abs().max().item() < 1e-4, chunk
    # one row: a level's blocks hold exactly the tokens its scorer kept
    kv, kept = make_cache(model, "full"), {}
    model.down[0].register_forward_hook(
        lambda m, i, o: kept.setdefault("n", []).append(int(o.valid.sum()))
    )
    with torch.no_grad():
        for t in range(12):
            piece = tokens[:1, t : t + 1]
            model(piece, position_ids=kv.begin(piece), cache=kv)
    inner = kv.kv[1][0].shape[2]  # layer 1 is the first block inside (
    assert inner == sum(kept["n"]) and 0 < inner < 12 and kv.kv[0][0].shape[2] == 12
