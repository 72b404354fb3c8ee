"""Cross-entropy fused with the LM head, in chunks of tokens: the [tokens, vocab] logits never exist whole.

Each chunk's logits are computed, turned into its losses and, when gradients are wanted, straight into
its gradients (the softmax is at hand): d(input) rows and a running d(weight). Backward only scales them
by the incoming gradient. So the matmuls are the unfused ones (one forward, two backward, none
recomputed), and peak memory holds one chunk's fp32 logits instead of the full logits, their fp32 copy,
the saved log-softmax and their gradients.

With a vocabulary-parallel head (tensor parallelism) the weight is this rank's rows, `start` the first of
them; `combine` merges the ranks' log-sum-exp and target logit (parallel/layers.py), and the caller sums
d(input) over the ranks (the column-parallel input region's backward does).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

CHUNK_BYTES = 1 << 28  # fp32 logits per chunk: 256 MiB, ~2K tokens at a 32K vocabulary


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, rows, start, combine, want_x, want_w):
        n, v = x.shape[0], weight.shape[0]
        dev = x.device.type
        # the head's matmuls in the dtype autocast gives the unfused linear (bf16 on GPU), cast once
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        wc = weight.to(cdt)
        acc = torch.promote_types(cdt, torch.float32)  # softmax and sums in fp32 at least
        losses = torch.empty(n, dtype=acc, device=x.device)
        gx = torch.empty_like(x) if want_x else None
        gw = (
            torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, acc), device=x.device)
            if want_w
            else None
        )
        for a in range(0, n, rows):
            xc, lc = x[a : a + rows].to(cdt), labels[a : a + rows]
            logits = F.linear(xc, wc).to(acc)
            outside = (lc < start) | (lc >= start + v)
            local = torch.where(outside, 0, lc - start)
            picked = logits.gather(1, local[:, None]).squeeze(1).masked_fill(outside, 0.0)
            lse = torch.logsumexp(logits, -1)
            if combine is not None:  # the ranks' vocabulary shards
                lse, picked = combine(lse, picked)
            losses[a : a + rows] = lse - picked
            if want_x or want_w:
                grad = (logits - lse[:, None]).exp_()  # softmax
                grad.scatter_add_(1, local[:, None], -(~outside).to(grad.dtype)[:, None])
                grad = grad.div_(n).to(cdt)
                if want_x:
                    gx[a : a + rows] = torch.mm(grad, wc)
                if want_w:
                    gw += torch.mm(grad.t(), xc)
        ctx.save_for_backward(gx, gw)
        ctx.weight_dtype = weight.dtype
        return losses.mean()

    @staticmethod
    def backward(ctx, g):
        gx, gw = ctx.saved_tensors
        return (
            None if gx is None else gx * g.to(gx.dtype),
            None if gw is None else (gw * g).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


Combine = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    start: int = 0,
    combine: Combine | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Mean cross-entropy of `labels` [...] under logits = x [..., h] @ weight[v, h]^T, in chunks of tokens.
    Equals F.cross_entropy(F.linear(x, weight).float(), labels) (and its gradients) without the logits."""
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    grad = torch.is_grad_enabled()
    return _LinearCE.apply(
        x.reshape(-1, x.shape[-1]),
        weight,
        labels.reshape(-1),
        rows,
        start,
        combine,
        grad and x.requires_grad,
        grad and weight.requires_grad,
    )


class CrossEntropy:
    """The model's loss on its head: mean token cross-entropy, fused with the head (chunks of tokens, no
    whole logits) or on the logits. Tensor parallelism and distillation put theirs in its place."""

    def __init__(self, fused: bool):
        self.fused = fused

    def __call__(self, head, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return linear_cross_entropy(x, head.weight, labels)
        logits = head(x)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))
