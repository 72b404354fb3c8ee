"""Context parallelism, DeepSpeed-Ulysses style.

Outside attention each cp rank holds 1/cp of the sequence: embeddings, norms, MLP and the
loss see only that slice. Around the attention core one all-to-all trades it for 1/cp of
the heads over the whole sequence, so the core (dense, SepLLM, StreamingLLM, fixed-interval;
triton, flex or reference) runs unchanged on full rows, with the AttentionBatch (is_sep, the
sparse plan) that every rank built from the full token sequence. A second all-to-all trades
back. q, k and v travel in one exchange. With GQA each rank takes whole kv heads with their
query heads, or, when cp exceeds the kv heads, a replica of the kv head its query heads use.
The exchanges are functional collectives with autograd, so torch.compile can trace them.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as fc

from .context import ParallelContext


def shard_seq(x: torch.Tensor, ctx: ParallelContext, dim: int = 1) -> torch.Tensor:
    """This cp rank's contiguous slice of the sequence dimension."""
    return x if ctx.cp == 1 else x.chunk(ctx.cp, dim=dim)[ctx.cp_rank]


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    """x [cp, ...]: block c goes to cp rank c; returns the blocks received, indexed by source rank."""
    return fc.all_to_all_single_autograd(x.contiguous(), None, None, group)


class UlyssesCore:
    """Wraps a core `(q, k, v, batch, dropout) -> o` over q [b, h, s/cp, d], k/v [b, hk, s/cp, d]."""

    def __init__(self, inner, ctx: ParallelContext):
        self.inner, self.group, self.cp = inner, ctx.cp_group, ctx.cp

    def __call__(self, q, k, v, batch, dropout=0.0):
        cp = self.cp
        b, h, s, d = q.shape
        # rank c needs kv head c // (cp / hk): replicate each kv head cp / hk times
        if k.shape[1] < cp:
            k = k.repeat_interleave(cp // k.shape[1], dim=1)
            v = v.repeat_interleave(cp // v.shape[1], dim=1)
        hk = k.shape[1]
        # [b, s, cp, heads/cp, d] per tensor; rank c's block is the c-th head slice of each
        parts = [t.transpose(1, 2).reshape(b, s, cp, t.shape[1] // cp, d) for t in (q, k, v)]
        send = torch.cat(parts, dim=3).permute(2, 0, 1, 3, 4)  # [cp, b, s, n, d]
        n = send.shape[3]
        # seq in rank order
        full = _exchange(send, self.group).permute(1, 0, 2, 3, 4).reshape(b, cp * s, n, d)
        q, k, v = (t.transpose(1, 2) for t in full.split([h // cp, hk // cp, hk // cp], dim=2))
        o = self.inner(q, k, v, batch, dropout)  # [b, h/cp, S, d]
        # [cp (seq slice), ...]
        o = o.transpose(1, 2).reshape(b, cp, s, h // cp, d).permute(1, 0, 2, 3, 4)
        o = _exchange(o, self.group)  # [cp (head slice), b, s, h/cp, d]
        return o.permute(1, 2, 0, 3, 4).reshape(b, s, h, d).transpose(1, 2)


def apply_context_parallel(model, ctx: ParallelContext):
    """In place: every layer's attention core runs over the whole sequence for its share of heads."""
    if ctx.cp == 1:
        return model
    for block in model.layers:
        block.attn.core = UlyssesCore(block.attn.core, ctx)
    return model
