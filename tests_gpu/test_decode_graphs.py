"""Decoding with CUDA graphs (inference/graphs.py) against eager decoding through the same static cache, and
speculative decoding under graphs against the target alone under graphs, on random models on the GPU.

Graph replay runs the kernels the eager step runs, so logits agree to bf16 rounding (atol 2e-2 where the
logits are about unit size) and greedy tokens agree exactly. The speculative check runs in fp32: a check of
k + 1 tokens and one-token steps differ by GEMM rounding only (about 1e-6), far below the gaps between a
random model's top logits, so greedy outputs must match token for token."""

import copy
from dataclasses import replace

import pytest
import torch

from megatron_sep.config import config_from_dict
from megatron_sep.inference import DecodeOptions, generate
from megatron_sep.inference.speculative import speculative_generate
from megatron_sep.model import build_model

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device; the CPU suite is tests/")


def model(kind, layers, dtype, seed=0):
    attention = {"kind": kind}
    if kind == "sepllm":
        attention.update(separators=[1, 2, 3], window=16, init_tokens=2)
    cfg = config_from_dict(
        {
            "model": {
                "family": "llama",
                "num_layers": layers,
                "hidden_size": 256,
                "num_heads": 4,
                "num_kv_heads": 2,
                "vocab_size": 300,
                "max_position_embeddings": 512,
            },
            "attention": attention,
            "data": {"seq_len": 512},
        }
    )
    torch.manual_seed(seed)
    return build_model(cfg).to("cuda", dtype).eval()


def prompt(n=20, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randint(4, 300, (1, n), device="cuda", generator=g)
    t[0, ::5] = 1  # separators for the SepLLM model
    return t


@pytest.mark.parametrize("kind", ["dense", "sepllm"])
def test_graphs_match_eager_static_cache(kind):
    m, p = model(kind, 4, torch.bfloat16), prompt()
    static, graphs = DecodeOptions(cache="static"), DecodeOptions(cuda_graphs=True)
    eager, le = generate(m, p, 60, static, output_logits=True)
    graphed, lg = generate(m, p, 60, graphs, output_logits=True)
    assert torch.equal(eager, graphed)
    torch.testing.assert_close(lg, le, atol=2e-2, rtol=0)
    again = generate(m, prompt(seed=3), 60, graphs)  # the kept graphs, replayed for another prompt
    assert torch.equal(again, generate(m, prompt(seed=3), 60, static))
    assert torch.equal(generate(copy.deepcopy(m), p, 60, graphs), graphed)  # a copy captures anew


@pytest.mark.parametrize("kind", ["dense", "sepllm"])
@pytest.mark.parametrize("k", [1, 4])
def test_speculative_under_graphs_equals_target_alone(kind, k):
    target = model(kind, 4, torch.float32)
    draft = copy.deepcopy(target)  # the target with noise on every weight: agrees often, not always
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(torch.randn_like(w) * 0.3 * w.std().clamp(min=1e-3))
    p = prompt(seed=k)
    graphs = DecodeOptions(cuda_graphs=True, draft_tokens=k)
    alone = generate(target, p, 50, graphs)
    out, stats = speculative_generate(target, draft, p, 50, graphs)
    assert torch.equal(out, alone)
    assert 0 < stats.accepted < stats.proposed  # rounds both kept proposals and took some back
    rounds = next(iter(target._decode_graphs.values())).rounds[k]  # greedy: one graph per round
    assert rounds.graph is not None
    other = prompt(n=33, seed=7)  # another prompt and length replays the kept round graph
    again, _ = speculative_generate(target, draft, other, 40, graphs)
    assert next(iter(target._decode_graphs.values())).rounds[k] is rounds
    assert torch.equal(again, generate(target, other, 40, graphs))
    sampled, _ = speculative_generate(target, draft, p, 30, replace(graphs, greedy=False, seed=1))
    # sampling keeps the host loop, with per-step graphs
    assert sampled.shape == (1, p.shape[1] + 30)


def test_graphs_refuse_a_cache_that_changes_shape():
    m, p = model("sepllm", 2, torch.bfloat16), prompt()
    with pytest.raises(ValueError, match="the sep cache changes its shape"):
        generate(m, p, 4, DecodeOptions(cuda_graphs=True, cache="sep"))
