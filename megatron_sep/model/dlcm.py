"""DLCM's own modules and math (Dynamic Large Concept Models, arXiv 2512.24617; docs/dlcm.md): the boundary
router, segments and their pooling into concepts, the decoder's causal cross-attention to concepts, and the
compression loss. The model class that runs them is model/dlcm_model.py.

Causality: a concept is visible to token t only once it cannot change. With mean pooling that is after its
segment ended, so token t sees the concepts of the segments before its own; with boundary pooling (the
segment's first token, as H-Net) it also sees its own segment's. The concept sequence starts with a learned
null concept that every token sees, so no token attends to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig


class Router(nn.Module):
    """p_t = (1 - cos(W_q h_{t-1}, W_k h_t)) / 2 (H-Net's routing module); p at stream position 0 is 1.
    W_q and W_k start as the identity (init_extra)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, hidden, bias=False)

    def reset(self) -> None:
        nn.init.eye_(self.q.weight)
        nn.init.eye_(self.k.weight)

    def forward(self, h, prev_q=None):
        """h [b, s, d] -> (p [b, s] fp32, the last token's q for the next chunk). Without prev_q the first
        token has no predecessor: its p is 0 here (the caller sets stream position 0 to 1)."""
        q, k = self.q(h).float(), self.k(h).float()
        before = q[:, :-1] if prev_q is None else torch.cat([prev_q[:, None], q[:, :-1]], 1)
        p = (1.0 - F.cosine_similarity(before, k[:, -before.shape[1] :], dim=-1)) / 2
        if prev_q is None:
            p = torch.cat([p.new_zeros(p.shape[0], 1), p], 1)
        return p, q[:, -1]


def compression_loss(p, b, ratio: float, per_sequence: bool = False, reduce=None):
    """The global parser's loss (the paper's L_aux) and the realised boundary rate F.
    G = mean boundary probability, F = realised boundary rate;
    L_aux = R/(R-1) * ((R-1) F G + (1-F)(1-G)) - 1, zero at F = G = 1/R. F is discrete: only G carries the
    gradient. `reduce` sums [sum p, sum b, count] over the data-parallel ranks (its backward sums too, so
    the average of the ranks' gradients is one process's); per_sequence: the loss per row, averaged."""
    r = float(ratio)
    if per_sequence:
        g, f = p.mean(1), b.float().mean(1)
        loss = r / (r - 1) * ((r - 1) * f * g + (1 - f) * (1 - g)) - 1
        return loss.mean(), f.mean()
    sums = torch.stack([p.sum(), b.float().sum(), p.new_tensor(float(p.numel()))])
    if reduce is not None:
        sums = reduce(sums)
    g, f = sums[0] / sums[2], (sums[1] / sums[2]).detach()
    return r / (r - 1) * ((r - 1) * f * g + (1 - f) * (1 - g)) - 1, f


def segment_sums(x, seg, n: int):
    """fp32 sums [b, n, d] and token counts [b, n] of x [b, s, d] per segment id seg [b, s] (0..n-1)."""
    bsz, _, d = x.shape
    sums = torch.zeros(bsz, n, d, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, seg[..., None].expand(-1, -1, d), x.float())
    counts = torch.zeros(bsz, n, dtype=torch.float32, device=x.device)
    counts.scatter_add_(1, seg, torch.ones_like(seg, dtype=torch.float32))
    return sums, counts


def pool(h, seg, b, n: int, mode: str):
    """Concepts [b, n, d] of the segments seg [b, s] (ids 0..n-1; ids past a row's last segment stay 0):
    the mean of each segment's tokens, or its first token (b marks the first tokens). Sums in fp32."""
    if mode == "mean":
        sums, counts = segment_sums(h, seg, n)
        return (sums / counts.clamp(min=1.0)[..., None]).to(h.dtype)
    return segment_sums(h * b[..., None], seg, n)[0].to(h.dtype)


def visible_slots(limit, slots: int):
    """[b, 1, s, slots] mask: token t sees concept slots 0..limit[b, t] (slot 0 is the null concept)."""
    return (torch.arange(slots, device=limit.device) <= limit[..., None])[:, None]


class CrossAttention(nn.Module):
    """x + out(attn(q from norm(x), k / v from the concepts)), RMSNorm (no weight) on q and k per head, no
    RoPE (concept slots and token positions are different axes). Heads as the token stack's."""

    def __init__(self, m: ModelConfig, concept_width: int, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.heads, self.kv_heads, self.head_dim = m.num_heads, m.kv_heads, m.head_dim
        self.eps = m.norm_eps
        bias = m.parts.bias
        self.q = nn.Linear(m.hidden_size, m.num_heads * m.head_dim, bias=bias)
        self.k = nn.Linear(concept_width, m.kv_heads * m.head_dim, bias=bias)
        self.v = nn.Linear(concept_width, m.kv_heads * m.head_dim, bias=bias)
        self.out = nn.Linear(m.num_heads * m.head_dim, m.hidden_size, bias=bias)

    def kv(self, z):
        """Keys and values [b, hk, n, d] of concepts z [b, n, concept_width]."""
        b, n = z.shape[:2]
        k = self.k(z).view(b, n, self.kv_heads, self.head_dim)
        v = self.v(z).view(b, n, self.kv_heads, self.head_dim)
        k = F.rms_norm(k, (self.head_dim,), eps=self.eps)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, k, v, mask):
        b, s = x.shape[:2]
        q = self.q(self.norm(x)).view(b, s, self.heads, self.head_dim)
        q = F.rms_norm(q, (self.head_dim,), eps=self.eps).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
        )
        return x + self.out(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


@dataclass
class ConceptState:
    """What decoding carries between chunks for DLCM (one row): the router's last q and separator flag, the
    open segment's sum and count, the segments started, the backbone's KV cache and each decoder layer's
    cross-attention keys and values (inference/dlcm_cache.py builds it)."""

    backbone: object  # a DecodeCache over the concept slots
    prev_q: torch.Tensor | None = None
    last_sep: torch.Tensor | None = None  # [b, 1] bool
    open_sum: torch.Tensor | None = None  # [b, d] fp32
    open_count: torch.Tensor | None = None  # [b] fp32
    segments: int = 0  # segments started so far (0: nothing seen, the null slot not yet run)
    cross: list = field(default_factory=list)  # per decoder layer: (k, v) over every slot so far

    def extend(self, layer: int, k, v):
        if len(self.cross) <= layer:
            self.cross.append((k, v))
        else:
            ok, ov = self.cross[layer]
            self.cross[layer] = (torch.cat([ok, k], 2), torch.cat([ov, v], 2))
        return self.cross[layer]
