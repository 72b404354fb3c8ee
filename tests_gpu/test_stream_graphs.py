"""The fixed-shape SepCache replayed as CUDA graphs (inference/graphs.GraphedChunks) against SepCache run
eagerly, on a random model on the GPU, over a stream 40x the capacity (hundreds of compressions).

fp32 weights and no autocast: both paths compute the same attention over the same retained keys (SepCache
over compacted columns, the graph over fixed columns with the rest masked), so logits agree to GEMM and
softmax rounding (atol 1e-4 on logits of about unit size) and the retained entries agree exactly. The
greedy tokens of `generate(cache="sep", cuda_graphs=True)` equal the eager SepCache's. bf16 under autocast
is also run (the eval path): logits within 5e-2 of the eager fixed-shape cache in bf16."""

import pytest
import torch

from megatron_sep.config import config_from_dict
from megatron_sep.inference import DecodeOptions, SepCache, generate
from megatron_sep.inference.generate import feed, make_cache
from megatron_sep.model import build_model

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device; the CPU suite is tests/")


def model(seed=0):
    cfg = config_from_dict(
        {
            "model": {
                "family": "llama",
                "num_layers": 3,
                "hidden_size": 256,
                "num_heads": 4,
                "num_kv_heads": 2,
                "vocab_size": 300,
                "max_position_embeddings": 4096,
            },
            "attention": {
                "kind": "sepllm",
                "separators": [1, 2, 3],
                "window": 16,
                "init_tokens": 2,
            },
            "data": {"seq_len": 4096},
        }
    )
    torch.manual_seed(seed)
    return build_model(cfg).cuda().eval()


def stream(n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randint(4, 300, (1, n), device="cuda", generator=g)
    hits = torch.rand(n, device="cuda", generator=g) < 0.15
    t[0, hits] = 1
    return t


SIZES = (2, 8, 16, 40)


@pytest.mark.parametrize("positions", ["original", "cache"])
@torch.no_grad()
def test_graphed_chunks_equal_eager_sep_cache(positions):
    m = model()
    tokens = stream(1600 + 5)  # 64-token chunks, then a short one (eager)
    ref = SepCache(m.cfg, m.sep_ids, init=2, seps=8, window=16, capacity=40, positions=positions)
    kv = make_cache(m, "sep", SIZES, positions, cuda_graphs=True, chunk=64)
    assert kv.graphs is not None
    for t in range(0, tokens.shape[1], 64):
        piece = tokens[:, t : t + 64]
        want = m(piece, position_ids=ref.begin(piece), cache=ref)
        got = feed(m, kv, piece)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        ref._commit()
        assert torch.equal(kv.entries(), ref.entries())
    assert set(kv.graphs.graphs) == {64} and kv.length == tokens.shape[1]


@torch.no_grad()
def test_generate_with_bounded_cache_under_graphs_and_bf16_streaming():
    m = model(1)
    prompt = stream(100, seed=1)
    opts = DecodeOptions(cache="sep", cache_sizes=SIZES)
    eager = generate(m, prompt, 80, opts)
    graphed = generate(
        m, prompt, 80, DecodeOptions(cache="sep", cache_sizes=SIZES, cuda_graphs=True)
    )
    assert torch.equal(graphed, eager)
    tokens = stream(1024, seed=2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = make_cache(m, "sep", SIZES, fixed_shape=True, chunk=64)
        b = make_cache(m, "sep", SIZES, cuda_graphs=True, chunk=64)
        for t in range(0, 1024, 64):
            piece = tokens[:, t : t + 64]
            torch.testing.assert_close(feed(m, b, piece), feed(m, a, piece), rtol=0, atol=5e-2)
