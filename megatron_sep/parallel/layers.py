"""Megatron's tensor-parallel layers, built from the full single-device modules they replace.

Building from the full module keeps initialisation identical to the plain model:
each rank takes its slice of the same weights, so tp=N starts where tp=1 does.
Parameters that every tp rank holds whole but that see only their sequence shard
under sequence parallelism are marked `sequence_parallel` in their ParamInfo (their grads are summed
over the tp group after backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .context import ParallelContext
from ..model.loss import linear_cross_entropy
from .params import mark
from .mappings import copy_to_tp, gather_seq, reduce_from_tp, reduce_scatter_seq


def _shard(t: torch.Tensor, ctx: ParallelContext, dim: int) -> nn.Parameter:
    p = nn.Parameter(t.detach().chunk(ctx.tp, dim=dim)[ctx.tp_rank].clone())
    mark(p, tp_dim=dim)  # for the grad norm and for sharded checkpoints
    return p


def _linear(layer, x, bias):
    """x W^T (+ b) on this rank's shard: in the autocast dtype, or in float8 when parallel/fp8.py set layer.fp8."""
    if layer.fp8 is None:
        return F.linear(x, layer.weight, bias)
    y = layer.fp8(x)
    return y if bias is None else y + bias.to(y.dtype)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows; the input is replicated (or gathered from seq shards)."""

    def __init__(self, full: nn.Linear, ctx: ParallelContext):
        super().__init__()
        self.group, self.sp = ctx.tp_group, ctx.sequence_parallel
        self.weight = _shard(full.weight, ctx, 0)
        self.bias = _shard(full.bias, ctx, 0) if full.bias is not None else None
        self.start = ctx.tp_rank * self.weight.shape[0]  # the first output row this rank holds
        self.fp8 = None  # parallel/fp8.py sets torchao's float8 matmul over this shard

    def gather_input(self, x):
        """The input every rank multiplies: gathered from sequence shards, or replicated (backward sums it)."""
        return gather_seq(x, self.group) if self.sp else copy_to_tp(x, self.group)

    def forward(self, x):
        return _linear(self, self.gather_input(x), self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns; partial sums reduced (or reduce-scattered to seq shards)."""

    def __init__(self, full: nn.Linear, ctx: ParallelContext):
        super().__init__()
        self.group, self.sp = ctx.tp_group, ctx.sequence_parallel
        self.weight = _shard(full.weight, ctx, 1)
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None
        if self.bias is not None and self.sp:
            mark(self.bias, sequence_parallel=True)
        self.fp8 = None  # parallel/fp8.py sets torchao's float8 matmul over this shard

    def forward(self, x):
        y = _linear(self, x, None)
        y = reduce_scatter_seq(y, self.group) if self.sp else reduce_from_tp(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    def __init__(self, full: nn.Embedding, ctx: ParallelContext):
        super().__init__()
        self.group, self.sp = ctx.tp_group, ctx.sequence_parallel
        self.weight = _shard(full.weight, ctx, 0)
        rows = self.weight.shape[0]
        self.start, self.end = ctx.tp_rank * rows, (ctx.tp_rank + 1) * rows

    def forward(self, ids):
        outside = (ids < self.start) | (ids >= self.end)
        local = torch.where(outside, 0, ids - self.start)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_scatter_seq(out, self.group) if self.sp else reduce_from_tp(out, self.group)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, start, group):
        logits_dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
        peak = logits.max(dim=-1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        logits = logits - peak[:, None]
        outside = (target < start) | (target >= start + logits.shape[-1])
        local = torch.where(outside, 0, target - start)
        picked = logits.gather(1, local[:, None]).squeeze(1).masked_fill(outside, 0.0)
        dist.all_reduce(picked, group=group)
        exp = logits.exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)
        ctx.save_for_backward(exp / total[:, None], local, outside)
        ctx.in_dtype = logits_dtype
        return total.log() - picked

    @staticmethod
    def backward(ctx, g):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(1, local[:, None], -(~outside).to(grad.dtype)[:, None])
        return (grad * g[:, None]).to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(logits, labels, ctx: ParallelContext):
    """Mean cross-entropy over tokens from vocab-sharded logits [..., V / tp]."""
    rows = logits.shape[-1]
    losses = _VocabParallelCE.apply(
        logits.reshape(-1, rows), labels.reshape(-1), ctx.tp_rank * rows, ctx.tp_group
    )
    return losses.mean()


def combine_over(group):
    """The fused loss's combine step (model/loss.py) for a vocabulary split over `group`: the ranks'
    log-sum-exp (stable, through their maximum) and the target's logit, which one rank holds."""

    def combine(lse, picked):
        peak = lse.clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        both = torch.stack([(lse - peak).exp(), picked])
        dist.all_reduce(both, group=group)
        return peak + both[0].log(), both[1]

    return combine


class VocabParallelCrossEntropy:
    """The model's loss under tensor parallelism: the head holds this rank's rows of the vocabulary."""

    def __init__(self, ctx: ParallelContext, fused: bool):
        self.ctx, self.fused = ctx, fused
        self.combine = combine_over(ctx.tp_group)

    def __call__(self, head, x, labels):
        if self.fused:
            return linear_cross_entropy(
                head.gather_input(x), head.weight, labels, head.start, self.combine
            )
        return vocab_parallel_cross_entropy(head(x), labels, self.ctx)
