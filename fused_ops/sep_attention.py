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
  window) per query (`sep_attention_triton.py`). GPU; no segment_ids yet.
- `auto`: `triton` on CUDA (faster than `flex` at every measured length on the
  H100: benchmarks/results/sep_attention_kernel_h100.md), `flex` on CUDA for
  what the kernel does not take (segment_ids, head dims other than 16/32/64/128),
  `reference` elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "reference", "flex", "triton")


def kept_keys(is_sep: torch.Tensor, init_tokens: int, segment_ids: torch.Tensor | None = None):
    """Per-token bool [b, s]: an initial token (of its document, with segments) or a separator."""
    b, s = is_sep.shape
    pos = torch.arange(s, device=is_sep.device).expand(b, s)
    if segment_ids is None:
        return is_sep | (pos < init_tokens)
    starts = torch.ones_like(is_sep)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_pos = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values
    return is_sep | (pos - start_pos < init_tokens)


def sep_mask(is_sep, init_tokens, window, segment_ids=None):
    """The explicit [b, s, s] visibility mask (reference backend and tests only)."""
    b, s = is_sep.shape
    i = torch.arange(s, device=is_sep.device)
    causal = i[None, :] <= i[:, None]
    band = (i[:, None] - i[None, :]) < window
    keep = kept_keys(is_sep, init_tokens, segment_ids)
    mask = causal & (band | keep[:, None, :])
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def _reference(q, k, v, is_sep, init_tokens, window, scale, segment_ids):
    mask = sep_mask(is_sep, init_tokens, window, segment_ids)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def auto_backend(cuda: bool, head_dim: int, segments: bool) -> str:
    if not cuda:
        return "reference"
    return "triton" if not segments and head_dim in (16, 32, 64, 128) else "flex"


def sep_attention(q, k, v, is_sep, *, init_tokens: int, window: int, backend: str = "auto", scale=None,
                  segment_ids=None):
    """q [b, hq, s, d], k/v [b, hk, s, d], is_sep bool [b, s] -> [b, hq, s, d]."""
    if backend not in BACKENDS:
        raise ValueError(f"sep_attention backend {backend!r} is unknown; use one of {BACKENDS}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    s = q.shape[2]
    if window >= s and segment_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    if backend == "auto":
        backend = auto_backend(q.is_cuda, q.shape[-1], segment_ids is not None)
    if backend == "triton":
        if segment_ids is not None:
            raise ValueError("the Triton SepAttention kernel does not take segment_ids (reset_per_document) yet. "
                             "Fix: use backend='flex' or 'reference'")
        from .sep_attention_triton import sep_attention_triton
        return sep_attention_triton(q, k, v, is_sep, init_tokens, window, scale)
    if backend == "flex":
        from .sep_attention_flex import flex_sep_attention
        return flex_sep_attention(q, k, v, is_sep, init_tokens, window, scale, segment_ids)
    return _reference(q, k, v, is_sep, init_tokens, window, scale, segment_ids)
