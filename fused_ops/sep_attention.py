"""SepLLM attention: one entry point, several backends.

Key j is visible to query i iff j <= i and (j < a  or  is_sep[j]  or  i - j < n):
`a` initial tokens, every earlier separator, and a window of n tokens counting i
itself. With `segment_ids` (packed documents, `reset_per_document`), a key must
also lie in the query's document, and "initial" means the first `a` tokens of
that document. `window >= seq` is dense causal attention.

Backends:
- `reference`: builds the boolean mask from the per-token vectors and runs SDPA;
  any device, the oracle for tests and the CPU path.
- `flex`: FlexAttention over keys [gathered initial+separator keys ; all keys]:
  the gathered part serves keys older than the window (a prefix of a sorted list,
  so block sparsity skips real work), the second part is the dense window band.
  One softmax covers both, so the result is exact. GPU only.
- `triton`: fused forward/backward kernels whose work grows with (#kept keys +
  window) per query (`sep_attention_triton.py`), with or without segment_ids. GPU.
- `auto`: `triton` on CUDA (faster than `flex` at every measured length:
  benchmarks/results/2026-12-01_sep_attention_kernel_h200.md), `flex` on CUDA for head dims
  other than 16/32/64/128, `reference` elsewhere.
What depends only on the tokens (kept keys, their gathered list, tile bounds, block masks) is the
micro-batch's plan (`sep_plan.py`), built once outside compiled code and passed to every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sep_plan import SepPlan, build_plan, kept_keys

BACKENDS = ("auto", "reference", "flex", "triton")
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def sep_mask(is_sep, init_tokens, window, segment_ids=None, keep=None):
    """The explicit [b, s, s] visibility mask (reference backend and tests only)."""
    b, s = is_sep.shape
    i = torch.arange(s, device=is_sep.device)
    causal = i[None, :] <= i[:, None]
    band = (i[:, None] - i[None, :]) < window
    keep = kept_keys(is_sep, init_tokens, segment_ids) if keep is None else keep
    mask = causal & (band | keep[:, None, :])
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def _reference(q, k, v, plan: SepPlan, init_tokens, window, scale):
    mask = sep_mask(plan.is_sep, init_tokens, window, plan.segment_ids, plan.keep)[:, None]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def resolve_backend(backend: str, cuda: bool, head_dim: int, segments: bool) -> str:
    """The backend that runs: `auto` picks triton on CUDA, flex for what the kernel does not take, reference
    off CUDA. An explicit choice that cannot serve the call is an error naming the one to use."""
    if backend not in BACKENDS:
        raise ValueError(f"sep_attention backend {backend!r} is unknown; use one of {BACKENDS}")
    if backend == "auto":
        if not cuda:
            return "reference"
        return "triton" if head_dim in TRITON_HEAD_DIMS else "flex"
    if backend == "triton" and head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"the Triton SepAttention kernel supports head dims {TRITON_HEAD_DIMS}, not {head_dim}. "
            "Fix: use backend='flex' or 'reference'"
        )
    return backend


def plan_for(
    is_sep, init_tokens, windows, backend, segment_ids=None, head_dim=128, max_kept=None
) -> SepPlan:
    """The micro-batch's plan for `backend` (resolved as `sep_attention` will resolve it); `max_kept` as in
    sep_plan.gather_plan."""
    backend = resolve_backend(backend, is_sep.is_cuda, head_dim, segment_ids is not None)
    rows = ()
    if backend == "triton":
        from .sep_attention_launch import tile_rows

        rows = tile_rows()
    return build_plan(is_sep, init_tokens, windows, backend, segment_ids, rows, max_kept)


def sep_attention(
    q,
    k,
    v,
    is_sep,
    *,
    init_tokens: int,
    window: int,
    backend: str = "auto",
    scale=None,
    segment_ids=None,
    plan: SepPlan | None = None,
    deterministic: bool = True,
):
    """q [b, hq, s, d], k/v [b, hk, s, d], is_sep bool [b, s] -> [b, hq, s, d]. `plan`: the micro-batch's
    (`plan_for`), shared by the layers; built here when not given. `deterministic` False lets the Triton
    backward add part of dQ with fp32 atomics (see sep_attention_triton)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    backend = resolve_backend(backend, q.is_cuda, q.shape[-1], segment_ids is not None)
    s = q.shape[2]
    if window >= s and segment_ids is None:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
    if plan is None:
        plan = plan_for(is_sep, init_tokens, [window], backend, segment_ids, q.shape[-1])
    if backend == "triton":
        from .sep_attention_triton import sep_attention_triton

        return sep_attention_triton(
            q,
            k,
            v,
            is_sep,
            init_tokens,
            window,
            scale,
            plan=plan,
            segment_ids=segment_ids,
            deterministic=deterministic,
        )
    if backend == "flex":
        from .sep_attention_flex import flex_sep_attention

        return flex_sep_attention(q, k, v, plan.index, plan.block_masks[window], scale)
    return _reference(q, k, v, plan, init_tokens, window, scale)
