"""sep_attention against an independent float64 softmax over an explicitly built mask."""

import itertools

import pytest
import torch

import fused_ops
from fused_ops.sep_attention_flex import gather_kv, make_mask_mod
from fused_ops.sep_plan import gather_plan, kept_keys


def oracle_mask(is_sep, a, n, seg=None):
    """The rule of DESIGN.md written out per (i, j), independently of the library."""
    b, s = is_sep.shape
    m = torch.zeros(b, s, s, dtype=torch.bool)
    for r in range(b):
        start = 0
        starts = []
        for t in range(s):
            if seg is not None and t > 0 and seg[r, t] != seg[r, t - 1]:
                start = t
            starts.append(start)
        for i, j in itertools.product(range(s), range(s)):
            if j > i:
                continue
            if seg is not None and seg[r, i] != seg[r, j]:
                continue
            m[r, i, j] = (j - starts[j] < a) or bool(is_sep[r, j]) or (i - j < n)
    return m


def oracle(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.softmax(scores, -1) @ v


def random_inputs(b, hq, hk, s, d, density, dtype=torch.float64):
    q, k, v = (torch.randn(b, h, s, d, dtype=dtype, requires_grad=True) for h in (hq, hk, hk))
    # rows get different separator counts: density scaled per row
    scale = torch.linspace(0.5, 1.0, b)[:, None] if 0 < density < 1 else torch.ones(b, 1)
    is_sep = torch.rand(b, s) < density * scale
    return q, k, v, is_sep


CASES = [
    (density, window, a)
    for density in (0.0, 0.05, 0.3, 1.0)
    for window in (1, 7, 64, 200)
    for a in (0, 3)
]


@pytest.mark.parametrize("density,window,a", CASES)
def test_reference_matches_oracle_forward_and_grads(density, window, a):
    s = 75 if window != 64 else 133  # lengths that are not multiples of 128; 200 >= seq is dense
    q, k, v, is_sep = random_inputs(3, 4, 2, s, 16, density)
    out = fused_ops.sep_attention(
        q, k, v, is_sep, init_tokens=a, window=window, backend="reference"
    )
    ref = oracle(q, k, v, oracle_mask(is_sep, a, window))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)  # float64 both sides
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_streamingllm_is_sepllm_without_separators_and_wide_window_is_dense():
    q, k, v, _ = random_inputs(2, 4, 4, 90, 8, 0.0)
    none = torch.zeros(2, 90, dtype=torch.bool)
    stream = fused_ops.sep_attention(q, k, v, none, init_tokens=4, window=16, backend="reference")
    ref = oracle(q, k, v, oracle_mask(none, 4, 16))
    torch.testing.assert_close(stream, ref, rtol=1e-10, atol=1e-10)
    seps = torch.rand(2, 90) < 0.2
    wide = fused_ops.sep_attention(q, k, v, seps, init_tokens=3, window=90, backend="reference")
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(wide, dense, rtol=1e-10, atol=1e-10)


def test_reset_per_document_segments():
    q, k, v, is_sep = random_inputs(2, 2, 1, 60, 8, 0.1)
    seg = torch.cumsum((torch.rand(2, 60) < 0.08).long(), dim=1)
    out = fused_ops.sep_attention(
        q, k, v, is_sep, init_tokens=2, window=5, backend="reference", segment_ids=seg
    )
    ref = oracle(q, k, v, oracle_mask(is_sep, 2, 5, seg))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "density,window,segments", [(0.1, 7, False), (0.3, 16, True), (0.0, 4, False), (1.0, 3, False)]
)
def test_two_part_formulation_is_exact(density, window, segments):
    """The flex backend's [gathered ; all] key layout and mask, evaluated densely on CPU."""
    s = 150
    q, k, v, is_sep = random_inputs(2, 4, 2, s, 8, density)
    seg = torch.cumsum((torch.rand(2, s) < 0.05).long(), dim=1) if segments else None
    index, gpos = gather_plan(kept_keys(is_sep, 3, seg))
    k_all, v_all = gather_kv(k, v, index)
    mask_mod = make_mask_mod(gpos, window, seg, s)
    bi = torch.arange(2)[:, None, None]
    qi = torch.arange(s)[None, :, None]
    kv = torch.arange(k_all.shape[2])[None, None, :]
    mask = mask_mod(bi, None, qi, kv)
    out = oracle(q, k_all, v_all, mask)
    ref = oracle(q, k, v, oracle_mask(is_sep, 3, window, seg))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(out)
    for g, r in zip(
        torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)
    ):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_bad_arguments():
    q, k, v, is_sep = random_inputs(1, 3, 2, 10, 4, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        fused_ops.sep_attention(q, k, v, is_sep, init_tokens=1, window=2)
    with pytest.raises(ValueError, match="backend"):
        fused_ops.sep_attention(
            q, k[:, :1], v[:, :1], is_sep, init_tokens=1, window=2, backend="magic"
        )
