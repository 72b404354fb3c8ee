"""The Triton SepAttention kernel under TRITON_INTERPRET=1 against a float64 reference.

fp32: the kernel accumulates in fp32 with IEEE dots: within 2e-5 of float64 on these sizes.
fp16: the kernel's error vs float64 stays within 2x that of the PyTorch reference run in fp16
(plus 2e-3 for rounding-order differences at fp16 resolution)."""

import pytest
import torch

import fused_ops
from fused_ops.sep_attention_triton import sep_attention_triton

SMALL = {name: {"BM": 16, "BN": 16} for name in ("fwd", "dq", "dkdv")}
CASES = [  # b, hq, hk, s, d, density, window, init
    (2, 4, 2, 45, 16, 0.2, 5, 2),
    (1, 2, 2, 70, 32, 0.05, 17, 3),
    (2, 2, 1, 33, 16, 1.0, 1, 0),
    (1, 2, 1, 50, 16, 0.0, 8, 3),
    (3, 2, 2, 40, 16, 0.3, 7, 3),
]


def run(fn, q, k, v, go):
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = fn(*x)
    o.backward(go.to(o.dtype))
    return [o.detach()] + [t.grad for t in x]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hq,hk,s,d,density,window,init", CASES)
def test_kernel_matches_reference(dtype, b, hq, hk, s, d, density, window, init):
    q, k, v = (torch.randn(b, h, s, d) for h in (hq, hk, hk))
    scale = torch.linspace(0.5, 1.0, b)[:, None] if 0 < density < 1 else torch.ones(b, 1)
    is_sep = torch.rand(b, s) < density * scale  # rows with different separator counts
    go = torch.randn(b, hq, s, d)

    def ref(*x):
        return fused_ops.sep_attention(
            *x, is_sep, init_tokens=init, window=window, backend="reference"
        )

    truth = run(ref, q.double(), k.double(), v.double(), go.double())
    kernel = run(
        lambda *x: sep_attention_triton(*x, is_sep, init, window, config=SMALL),
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        go.to(dtype),
    )
    if dtype == torch.float32:
        for name, a, t in zip(("o", "dq", "dk", "dv"), kernel, truth):
            assert (a.double() - t).abs().max().item() < 2e-5, name
    else:
        base = run(ref, q.to(dtype), k.to(dtype), v.to(dtype), go.to(dtype))
        for name, a, r, t in zip(("o", "dq", "dk", "dv"), kernel, base, truth):
            err, ref_err = (a.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
            assert err <= 2 * ref_err + 2e-3, (name, err, ref_err)


def test_entry_point_dispatch_and_dense_fallback():
    q, k, v = (torch.randn(1, 2, 30, 16) for _ in range(3))
    is_sep = torch.rand(1, 30) < 0.2
    via_entry = fused_ops.sep_attention(q, k, v, is_sep, init_tokens=2, window=4, backend="triton")
    ref = fused_ops.sep_attention(q, k, v, is_sep, init_tokens=2, window=4, backend="reference")
    torch.testing.assert_close(via_entry, ref, rtol=0, atol=2e-5)
    dense = fused_ops.sep_attention(q, k, v, is_sep, init_tokens=2, window=30, backend="triton")
    torch.testing.assert_close(
        dense, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    )
    with pytest.raises(ValueError, match="head dims"):
        sep_attention_triton(
            torch.randn(1, 1, 8, 24),
            torch.randn(1, 1, 8, 24),
            torch.randn(1, 1, 8, 24),
            torch.zeros(1, 8, dtype=torch.bool),
            1,
            2,
        )


@pytest.mark.parametrize("resets", [False, True])
def test_model_with_triton_attention_backend(resets):
    from megatron_sep.config import config_from_dict
    from megatron_sep.model import build_model

    out = {}
    tokens = torch.randint(0, 40, (2, 37))
    for backend in ("reference", "triton"):
        cfg = config_from_dict(
            {
                "model": {
                    "family": "llama",
                    "num_layers": 2,
                    "hidden_size": 32,
                    "num_heads": 2,
                    "vocab_size": 40,
                    "max_position_embeddings": 64,
                },
                "attention": {
                    "kind": "sepllm",
                    "separators": [1, 2, 3, 4],
                    "window": [3, 9],
                    "init_tokens": 2,
                    "backend": backend,
                    "reset_per_document": resets,
                    "eod_id": 5,
                    "deterministic": not resets,
                },
                "data": {"seq_len": 64},
            }
        )
        torch.manual_seed(0)
        m = build_model(cfg)
        loss = m(tokens[:, :-1], tokens[:, 1:])
        out[backend] = [loss] + list(torch.autograd.grad(loss, list(m.parameters())))
    for a, b in zip(out["triton"], out["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def random_segments(b, s, docs):
    """[b, s] document ids: `docs` documents per row at random cut points (row 1 gets one more)."""
    ids = torch.zeros(b, s, dtype=torch.long)
    for r in range(b):
        cuts = torch.randperm(s - 1)[: docs + r] + 1
        ids[r, cuts] = 1
    return ids.cumsum(1)


def assert_fp32_kernel_matches(s, densities, window, cfg, docs=0):
    """fp32 kernel with launch shapes `cfg` against float64 (b=2 rows with the given separator densities,
    4 query heads on 2 kv heads, init 3, `docs` > 0: that many document resets per row), forward and grads
    within 2e-5."""
    b, hq, hk, d = 2, 4, 2, 16
    q, k, v = (torch.randn(b, h, s, d) for h in (hq, hk, hk))
    is_sep = torch.rand(b, s) < torch.tensor(densities)[:, None]
    seg = random_segments(b, s, docs) if docs else None
    go = torch.randn(b, hq, s, d)
    truth = run(
        lambda *x: fused_ops.sep_attention(
            *x, is_sep, init_tokens=3, window=window, backend="reference", segment_ids=seg
        ),
        q.double(),
        k.double(),
        v.double(),
        go.double(),
    )
    kernel = run(
        lambda *x: sep_attention_triton(*x, is_sep, 3, window, config=cfg, segment_ids=seg),
        q,
        k,
        v,
        go,
    )
    for name, a, t in zip(("o", "dq", "dk", "dv"), kernel, truth):
        assert (a.double() - t).abs().max().item() < 2e-5, name


def test_kernels_with_different_tile_shapes():
    """fwd, dQ and dK/dV tiled differently (each kernel has its own plan entry) still match."""
    cfg = {"fwd": {"BM": 32, "BN": 16}, "dq": {"BM": 16, "BN": 32}, "dkdv": {"BM": 32, "BN": 16}}
    assert_fp32_kernel_matches(77, [0.1, 0.3], 6, cfg)


def test_auto_backend_choice():
    from fused_ops import resolve_backend

    assert resolve_backend("auto", False, 128, False) == "reference"
    assert resolve_backend("auto", True, 128, False) == "triton"
    # document resets run in the kernel too
    assert resolve_backend("auto", True, 128, True) == "triton"
    assert resolve_backend("auto", True, 96, False) == "flex"
    with pytest.raises(ValueError, match="head dims"):
        resolve_backend("triton", True, 96, False)


@pytest.mark.parametrize("split,window", [(1, 45), (3, 100), (7, 45)])
def test_dkdv_split_and_unmasked_blocks(split, window):
    """List tiles' queries shared by `split` programs (fp32 partials summed in the band kernel; 7 leaves some
    programs without queries), and windows wide enough for band tiles to have fully visible query blocks."""
    cfg = {name: {"BM": 16, "BN": 16} for name in ("fwd", "dq")}
    cfg["dkdv"] = {"BM": 16, "BN": 16, "split": split}
    assert_fp32_kernel_matches(130, [0.15, 0.4], window, cfg)


@pytest.mark.parametrize("docs,window,split", [(1, 6, 1), (4, 20, 2), (9, 45, 3), (3, 200, 1)])
def test_document_resets_in_the_kernel(docs, window, split):
    """segment_ids (reset_per_document): keys only from the query's document, init tokens per document; tiles
    that span documents mask, tiles inside one keep the unmasked fast path (window 200 > s: dense per doc)."""
    cfg = {
        "fwd": {"BM": 16, "BN": 16},
        "dq": {"BM": 32, "BN": 16},
        "dkdv": {"BM": 16, "BN": 16, "split": split},
    }
    assert_fp32_kernel_matches(150, [0.15, 0.4], window, cfg, docs=docs)


def test_launch_variants_tma_and_grid_order():
    """Key/value blocks through tensor descriptors and the heads-first grid give the same numbers."""
    cfg = {
        "fwd": {"BM": 16, "BN": 16, "TMA": 1, "HEADS_FIRST": 1},
        "dq": {"BM": 16, "BN": 16, "TMA": 1},
        "dkdv": {"BM": 16, "BN": 16},
    }
    assert_fp32_kernel_matches(90, [0.1, 0.3], 9, cfg, docs=2)


@pytest.mark.parametrize("docs,split", [(0, 1), (3, 2)])
def test_atomic_dq_matches_reference(docs, split):
    """deterministic=False: the kept keys' dQ is added by the list dK/dV programs with fp32 atomics; same
    numbers as float64 within 2e-5 (fp32), with GQA, documents and split list tiles."""
    b, hq, hk, s, d = 2, 4, 2, 110, 16
    q, k, v = (torch.randn(b, h, s, d) for h in (hq, hk, hk))
    is_sep = torch.rand(b, s) < torch.tensor([0.1, 0.3])[:, None]
    seg = random_segments(b, s, docs) if docs else None
    go = torch.randn(b, hq, s, d)
    truth = run(
        lambda *x: fused_ops.sep_attention(
            *x, is_sep, init_tokens=3, window=9, backend="reference", segment_ids=seg
        ),
        q.double(),
        k.double(),
        v.double(),
        go.double(),
    )
    cfg = {
        "fwd": {"BM": 16, "BN": 16},
        "dq": {"BM": 32, "BN": 16},
        "dkdv": {"BM": 16, "BN": 16, "split": split},
    }
    kernel = run(
        lambda *x: sep_attention_triton(
            *x, is_sep, 3, 9, config=cfg, segment_ids=seg, deterministic=False
        ),
        q,
        k,
        v,
        go,
    )
    for name, a, t in zip(("o", "dq", "dk", "dv"), kernel, truth):
        assert (a.double() - t).abs().max().item() < 2e-5, name
