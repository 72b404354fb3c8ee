"""Every tensor-parallel collective as a small autograd function with its conjugate backward.

copy_to_tp        fwd identity          bwd all-reduce      (input of a column-parallel layer)
reduce_from_tp    fwd all-reduce        bwd identity        (output of a row-parallel layer)
gather_seq        fwd all-gather seq    bwd reduce-scatter  (sequence parallel -> full sequence)
reduce_scatter_seq fwd reduce-scatter   bwd all-gather      (row-parallel output -> sequence shards)
split_seq         fwd take own shard    bwd all-gather      (full sequence -> sequence shards)
gather_seq_whole  fwd all-gather seq    bwd take own shard  (shards -> a full sequence every rank then
                                                             uses alike: SUBLLM's scorer and upsampling)
sum_over          fwd all-reduce        bwd all-reduce      (a sum every rank uses alike in its loss:
                                                             DLCM's global parser over data parallelism)
The sequence dimension is dim 1 ([batch, seq, hidden]).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


# torch 2.13 renamed the single-tensor collectives; 2.11 (the GPU machines) has only the old names
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce(x, group):
    """Out of place: autograd may hand the same gradient tensor to several consumers."""
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x, group, dim):
    world = dist.get_world_size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _ALL_GATHER(out, x, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x, group, dim):
    world = dist.get_world_size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    _REDUCE_SCATTER(out, x, group=group)
    return out.movedim(0, dim)


def _split(x, group, dim):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(world, dim=dim)[rank].contiguous()


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group, 1)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.group, 1), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group, 1)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, 1), None


class _GatherWhole(_GatherSeq):
    """_GatherSeq's forward; every rank then computes alike on the whole sequence, so each rank's gradient
    is already the whole one and the backward keeps its own shard (no sum)."""

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.group, 1), None


class _SplitSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, 1)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.group, 1), None


class _SumOver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        # every rank's loss used the sum: its gradient is the ranks' total (the gradient average undoes it)
        return _all_reduce(g, ctx.group), None


def sum_over(x, group):
    return _SumOver.apply(x, group)


def copy_to_tp(x, group):
    return _Copy.apply(x, group)


def reduce_from_tp(x, group):
    return _Reduce.apply(x, group)


def gather_seq(x, group):
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x, group):
    return _ReduceScatterSeq.apply(x, group)


def split_seq(x, group):
    return _SplitSeq.apply(x, group)


def gather_seq_whole(x, group):
    return _GatherWhole.apply(x, group)
