"""The attention core: one pluggable function per layer.

`build_core_attention(cfg, layer)` returns `core(q, k, v, batch, dropout)` with
q [b, hq, s, d], k/v [b, hk, s, d] -> [b, hq, s, d]. `batch` carries per-microbatch
tensors computed once (token ids, and later the separator mask) for every layer.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..config import Config


def dense_causal(q, k, v, batch, dropout=0.0):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                          enable_gqa=k.shape[1] != q.shape[1])


def build_core_attention(cfg: Config, layer: int):
    if cfg.attention.kind == "dense":
        return dense_causal
    raise ValueError(f"attention.kind={cfg.attention.kind!r} is not supported")
