"""Data parallelism: bucketed gradient reduction overlapped with backward, and ZeRO-1.

Parameters are packed, in reverse registration order (roughly the order backward
produces their grads), into buckets of `bucket_mb`. A post-accumulate-grad hook
counts a bucket's ready grads on the last micro-batch and launches its reduction
asynchronously while backward goes on. Without ZeRO the bucket is all-reduced
(averaged) and copied back into `.grad`. With ZeRO-1 each bucket's parameters live
in one flat buffer, the grads are reduce-scattered so each data-parallel rank owns
one contiguous shard, and `ZeroAdamW` keeps fp32 master weights and Adam states
for that shard only, then all-gathers the updated parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from .context import ParallelContext
from .params import info
from .mappings import _ALL_GATHER, _REDUCE_SCATTER


class Bucket:
    def __init__(self, params, dp: int, flat_params: bool):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.padded = dp * math.ceil(self.numel / dp)
        dev, dtype = params[0].device, params[0].dtype
        self.grad = torch.zeros(self.padded, dtype=torch.float32, device=dev)
        self.offsets, off = {}, 0
        for p in params:
            self.offsets[p] = off
            off += p.numel()
        if flat_params:  # ZeRO-1: parameters become views of one buffer the all-gather writes into
            self.data = torch.zeros(self.padded, dtype=dtype, device=dev)
            for p in params:
                o = self.offsets[p]
                self.data[o : o + p.numel()].copy_(p.detach().reshape(-1))
                p.data = self.data[o : o + p.numel()].view_as(p)
        self.ready = 0
        self.handle = None


class GradSync:
    """Averages gradients over the replicas (dp x cp, `ctx.grad_group`); `zero` selects reduce-scatter."""

    def __init__(self, params, ctx: ParallelContext, bucket_mb: float, zero: bool, manual=()):
        """`manual` params (a pipeline's tied embedding, whose grad is completed after backward) get
        a bucket of their own that only `finish` launches."""
        self.ctx, self.zero = ctx, zero
        self.enabled = False  # set for the last micro-batch of a step
        self.buckets: list[Bucket] = []
        limit = bucket_mb * 2**20
        current, size = [], 0
        manual = [p for p in manual if p is not None]
        for p in reversed(
            [p for p in params if p.requires_grad and all(p is not m for m in manual)]
        ):
            current.append(p)
            size += p.numel() * 4
            if size >= limit:
                self.buckets.append(Bucket(current, ctx.grad_size, zero))
                current, size = [], 0
        if current:
            self.buckets.append(Bucket(current, ctx.grad_size, zero))
        for b in self.buckets:
            for p in b.params:
                p.register_post_accumulate_grad_hook(self._hook)
        if manual:
            self.buckets.append(Bucket(manual, ctx.grad_size, zero))
        self.bucket_of = {p: b for b in self.buckets for p in b.params}

    def _hook(self, p):
        if not self.enabled:
            return
        b = self.bucket_of[p]
        b.ready += 1
        if b.ready == len(b.params):
            self._launch(b)

    def _launch(self, b: Bucket) -> None:
        for p in b.params:
            o = b.offsets[p]
            src = p.grad if p.grad is not None else torch.zeros_like(p)
            b.grad[o : o + p.numel()].copy_(src.reshape(-1))
        b.grad.div_(self.ctx.grad_size)
        if self.zero:
            shard = b.grad.numel() // self.ctx.grad_size
            b.shard_grad = torch.empty(shard, dtype=b.grad.dtype, device=b.grad.device)
            b.handle = _REDUCE_SCATTER(
                b.shard_grad, b.grad, group=self.ctx.grad_group, async_op=True
            )
        else:
            b.handle = dist.all_reduce(b.grad, group=self.ctx.grad_group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket (launching any whose hooks did not all fire) and publish the result."""
        for b in self.buckets:
            if b.handle is None:
                self._launch(b)
            b.handle.wait()
            b.handle, b.ready = None, 0
            if not self.zero:
                for p in b.params:
                    o = b.offsets[p]
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(b.grad[o : o + p.numel()].view_as(p))
        self.enabled = False


class Segment(NamedTuple):
    """The elements of one parameter that fall in this rank's shard of a bucket."""

    bucket: Bucket
    param: torch.nn.Parameter
    start: int  # [start, end) in the bucket's flat buffers
    end: int
    master: torch.nn.Parameter  # fp32 copy of those elements
    shard_start: int  # where this rank's shard begins in the bucket

    @property
    def in_shard(self) -> slice:
        return slice(self.start - self.shard_start, self.end - self.shard_start)


class ZeroAdamW:
    """AdamW over this replica's shard of every bucket (fp32 master weights), sharded over dp x cp."""

    def __init__(self, sync: GradSync, decay_of, lr, betas, eps, weight_decay, scales=None):
        self.sync, self.ctx = sync, sync.ctx
        self.segments: list[Segment] = []
        scales = scales or {}
        groups = {(True, 1.0): [], (False, 1.0): []}  # (decays, learning-rate multiplier)
        for b in sync.buckets:
            lo, hi = self.shard_bounds(b)
            for p in b.params:
                o = b.offsets[p]
                s, e = max(lo, o), min(hi, o + p.numel())
                if s < e:
                    master = torch.nn.Parameter(b.data[s:e].detach().float().clone())
                    self.segments.append(Segment(b, p, s, e, master, lo))
                    key = (decay_of(p), scales.get(id(p), 1.0))
                    groups.setdefault(key, []).append(master)
        param_groups = [
            {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in groups.items()
        ]
        self.opt = torch.optim.AdamW(
            [g for g in param_groups if g["params"]], lr=lr, betas=betas, eps=eps
        )
        self.param_groups = self.opt.param_groups

    def shard_bounds(self, b: Bucket) -> tuple[int, int]:
        shard = b.padded // self.ctx.grad_size
        return self.ctx.grad_rank * shard, (self.ctx.grad_rank + 1) * shard

    def shard_grads(self):
        """(grad segment, param) pairs this rank owns, for the global gradient norm."""
        return [(seg.bucket.shard_grad[seg.in_shard], seg.param) for seg in self.segments]

    def step(self, clip_coef: float = 1.0) -> None:
        for seg in self.segments:
            seg.master.grad = seg.bucket.shard_grad[seg.in_shard] * clip_coef
        self.opt.step()
        own = {id(b): b.data[slice(*self.shard_bounds(b))] for b in self.sync.buckets}
        for seg in self.segments:
            own[id(seg.bucket)][seg.in_shard].copy_(seg.master.detach())
        for b in self.sync.buckets:
            _ALL_GATHER(b.data, own[id(b)].clone(), group=self.ctx.grad_group)

    def zero_grad(self, set_to_none=True):
        for p in self.sync.bucket_of:
            p.grad = None
        self.opt.zero_grad(set_to_none=set_to_none)


def global_grad_norm(
    grads_and_params, ctx: ParallelContext, sharded_over_dp: bool, loss: torch.Tensor | None = None
) -> torch.Tensor:
    """L2 norm over all shards of all groups. A tp-replicated parameter counts once (on tp rank 0).
    A non-finite `loss` makes the norm NaN on every rank (it rides the same reduction: no extra sync)."""
    grads = [
        g.detach()
        for g, p in grads_and_params
        if g is not None
        and (info(p).tensor_parallel or ctx.tp_rank == 0)
        and not info(p).pipeline_duplicate
    ]  # the last stage's copy of the tied embedding
    if not grads:
        total = torch.zeros((), device=ctx.device)
    # torch >= 2.6: one multi-tensor pass, no temporaries
    elif hasattr(torch.nn.utils, "get_total_norm"):
        total = torch.nn.utils.get_total_norm(grads, 2.0).float() ** 2
    else:
        total = sum(torch.linalg.vector_norm(g.float()) ** 2 for g in grads)
    if loss is not None:
        total = total + loss.detach().float() * 0  # inf * 0 and nan * 0 are nan
    if ctx.world > 1:
        groups = [ctx.tp_group, ctx.pp_group] + ([ctx.grad_group] if sharded_over_dp else [])
        for g in groups:
            if dist.get_world_size(g) > 1:
                dist.all_reduce(total, group=g)
    return total.sqrt()
