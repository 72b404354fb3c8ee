"""Cross-entropy fused with the LM head, in chunks of tokens: the [tokens, vocab] logits never exist whole.

Each chunk's logits are computed, turned into its losses and, when gradients are wanted, straight into
its gradients (the softmax is at hand): d(input) rows and a running d(weight). Backward only scales them
by the incoming gradient. So the matmuls are the unfused ones (one forward, two backward, none
recomputed), and peak memory holds one chunk's fp32 logits instead of the full logits, their fp32 copy,
the saved log-softmax and their gradients.

With a vocabulary-parallel head (tensor parallelism) the weight is this rank's rows, `start` the first of
them; the log-sum-exp and the target's logit are combined over `group`, and the caller sums d(input) over
the group (the column-parallel input region's backward does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

CHUNK_BYTES = 1 << 28  # fp32 logits per chunk: 256 MiB, ~2K tokens at a 32K vocabulary


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, rows, start, group, want_x, want_w):
        n, v = x.shape[0], weight.shape[0]
        dev = x.device.type
        # the head's matmuls in the dtype autocast gives the unfused linear (bf16 on GPU), cast once
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        wc = weight.to(cdt)
        acc = torch.promote_types(cdt, torch.float32)  # softmax and sums in fp32 at least
        losses = torch.empty(n, dtype=acc, device=x.device)
        gx = torch.empty_like(x) if want_x else None
        gw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, acc), device=x.device) if want_w else None
        for a in range(0, n, rows):
            xc, lc = x[a:a + rows].to(cdt), labels[a:a + rows]
            logits = F.linear(xc, wc).to(acc)
            outside = (lc < start) | (lc >= start + v)
            local = torch.where(outside, 0, lc - start)
            picked = logits.gather(1, local[:, None]).squeeze(1).masked_fill(outside, 0.0)
            lse = torch.logsumexp(logits, -1)
            if group is not None:  # combine the ranks' vocabulary shards
                peak = lse.clone()
                dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
                both = torch.stack([(lse - peak).exp(), picked])
                dist.all_reduce(both, group=group)
                lse, picked = peak + both[0].log(), both[1]
            losses[a:a + rows] = lse - picked
            if want_x or want_w:
                grad = (logits - lse[:, None]).exp_()  # softmax
                grad.scatter_add_(1, local[:, None], -(~outside).to(grad.dtype)[:, None])
                grad = grad.div_(n).to(cdt)
                if want_x:
                    gx[a:a + rows] = torch.mm(grad, wc)
                if want_w:
                    gw += torch.mm(grad.t(), xc)
        ctx.save_for_backward(gx, gw)
        ctx.weight_dtype = weight.dtype
        return losses.mean()

    @staticmethod
    def backward(ctx, g):
        gx, gw = ctx.saved_tensors
        return (None if gx is None else gx * g.to(gx.dtype), None if gw is None else (gw * g).to(ctx.weight_dtype),
                None, None, None, None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, start: int = 0,
                         group=None, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Mean cross-entropy of `labels` [...] under logits = x [..., h] @ weight[v, h]^T, in chunks of tokens.
    Equals F.cross_entropy(F.linear(x, weight).float(), labels) (and its gradients) without the logits."""
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    grad = torch.is_grad_enabled()
    return _LinearCE.apply(x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1), rows, start, group,
                           grad and x.requires_grad, grad and weight.requires_grad)


@dataclass
class TeacherTargets:
    """A micro-batch's labels plus its teacher (training/distill.py): the head's loss becomes distillation's.
    The teacher's logits are computed when the loss needs them, so one micro-batch's are in memory at a time."""
    labels: torch.Tensor
    teacher_logits: Callable[[], torch.Tensor]  # () -> [b, s, vocab]
    weight: float  # share of the distillation term; the rest is cross-entropy on the labels
    temperature: float


def distill_loss(logits: torch.Tensor, targets: TeacherTargets) -> torch.Tensor:
    """(1 - w) CE(labels) + w T^2 KL(softmax(teacher / T) || softmax(student / T)), means over tokens (Hinton
    et al. 2015). The forward KL is what DistillSpec (Zhou et al. 2023) found to raise a draft's acceptance.
    T^2 keeps the gradient's scale independent of T."""
    v, w, t = logits.shape[-1], targets.weight, targets.temperature
    student = logits.float().reshape(-1, v)
    with torch.no_grad():
        teacher = F.log_softmax(targets.teacher_logits().float().reshape(-1, v) / t, -1)
    loss = w * t * t * F.kl_div(F.log_softmax(student / t, -1), teacher, log_target=True, reduction="batchmean")
    if w < 1:
        loss = loss + (1 - w) * F.cross_entropy(student, targets.labels.reshape(-1))
    return loss
