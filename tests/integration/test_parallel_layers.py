"""Each collective wrapper and tensor-parallel layer against its unsharded op, forward and backward,
on gloo with spawned processes. fp64 throughout: differences are summation order only (1e-12)."""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_sep.parallel.context import ParallelContext

from ..dist_utils import init_gloo, run_distributed

TOL = dict(rtol=1e-10, atol=1e-12)


def _ctx(rank, world, sp=False):
    return ParallelContext(
        world=world,
        rank=rank,
        tp=world,
        tp_rank=rank,
        tp_group=dist.group.WORLD,
        sequence_parallel=sp,
    )


def _mappings(rank, world):
    from megatron_sep.parallel import mappings as mp_

    init_gloo(world)
    g = dist.group.WORLD
    torch.manual_seed(0)  # every rank draws the same full tensors
    x = torch.randn(2, 4 * world, 3, dtype=torch.float64)
    dy = torch.randn(2, 4 * world, 3, dtype=torch.float64)
    per_rank = [torch.randn(2, 4 * world, 3, dtype=torch.float64) for _ in range(world)]
    mine = per_rank[rank].clone().requires_grad_()
    out = {}
    # reduce_from_tp: sum of every rank's input; backward passes the grad through
    y = mp_.reduce_from_tp(mine, g)
    y.backward(dy)
    out["reduce"] = (torch.allclose(y, sum(per_rank), **TOL), torch.allclose(mine.grad, dy, **TOL))
    # copy_to_tp: identity; backward sums the grads of all ranks
    xi = x.clone().requires_grad_()
    y = mp_.copy_to_tp(xi, g)
    y.backward(per_rank[rank])
    out["copy"] = (torch.equal(y, x), torch.allclose(xi.grad, sum(per_rank), **TOL))
    # gather_seq / split_seq / reduce_scatter_seq against slicing the full tensor
    shard = x.chunk(world, 1)[rank].clone().requires_grad_()
    y = mp_.gather_seq(shard, g)
    y.backward(per_rank[rank])
    out["gather"] = (
        torch.equal(y, x),
        torch.allclose(shard.grad, sum(per_rank).chunk(world, 1)[rank], **TOL),
    )
    xs = x.clone().requires_grad_()
    y = mp_.split_seq(xs, g)
    y.backward(dy.chunk(world, 1)[rank])
    out["split"] = (torch.equal(y, x.chunk(world, 1)[rank]), torch.allclose(xs.grad, dy, **TOL))
    mine = per_rank[rank].clone().requires_grad_()
    y = mp_.reduce_scatter_seq(mine, g)
    y.backward(dy.chunk(world, 1)[rank])
    out["reduce_scatter"] = (
        torch.allclose(y, sum(per_rank).chunk(world, 1)[rank], **TOL),
        torch.allclose(mine.grad, dy, **TOL),
    )
    dist.destroy_process_group()
    return out


def test_collective_wrappers_match_unsharded_ops():
    for result in run_distributed(_mappings, 2):
        assert all(all(v) for v in result.values()), result


def _layers(rank, world, sp):
    from megatron_sep.parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        combine_over,
        vocab_parallel_cross_entropy,
    )
    from megatron_sep.model.loss import linear_cross_entropy
    from megatron_sep.parallel.mappings import gather_seq

    init_gloo(world)
    ctx = _ctx(rank, world, sp)
    torch.manual_seed(0)
    col, row = nn.Linear(6, 8 * world).double(), nn.Linear(8 * world, 5).double()
    emb = nn.Embedding(16 * world, 6).double()
    ids = torch.randint(0, 16 * world, (2, 4 * world))
    labels = torch.randint(0, 16 * world, (2, 4 * world))
    # reference: the plain modules, one process
    h = emb(ids)
    ref_out = row(torch.tanh(col(h)))
    head = nn.Linear(5, 16 * world, bias=False).double()
    ref_loss = F.cross_entropy(head(ref_out).reshape(-1, 16 * world), labels.reshape(-1))
    ref_loss.backward()
    pcol, prow = ColumnParallelLinear(col, ctx), RowParallelLinear(row, ctx)
    pemb, phead = VocabParallelEmbedding(emb, ctx), ColumnParallelLinear(head, ctx)
    checks = {}
    # the vocab-parallel loss on the head's logits, then the fused one in chunks of 3 tokens (16 per rank's rows)
    for fused in (False, True):
        for m in (pcol, prow, pemb, phead):
            m.zero_grad(set_to_none=True)
        x = pemb(ids)  # [b, s / tp, h] under sp, else [b, s, h]
        y = prow(torch.tanh(pcol(x)))
        if fused:
            loss = linear_cross_entropy(
                phead.gather_input(y),
                phead.weight,
                labels,
                phead.start,
                combine_over(ctx.tp_group),
                chunk_bytes=8 * 16 * 3,
            )
        else:
            loss = vocab_parallel_cross_entropy(phead(y), labels, ctx)
        loss.backward()
        full_y = gather_seq(y, ctx.tp_group) if sp else y
        checks[fused, "loss"] = torch.allclose(loss, ref_loss, **TOL)
        checks[fused, "out"] = torch.allclose(full_y, ref_out, **TOL)
        for name, par, ref, dim in (
            ("col", pcol.weight, col.weight, 0),
            ("row", prow.weight, row.weight, 1),
            ("emb", pemb.weight, emb.weight, 0),
            ("head", phead.weight, head.weight, 0),
        ):
            checks[fused, name] = torch.allclose(par.grad, ref.grad.chunk(world, dim)[rank], **TOL)
        checks[fused, "col_bias"] = torch.allclose(
            pcol.bias.grad, col.bias.grad.chunk(world)[rank], **TOL
        )
        bias_grad = prow.bias.grad.clone()
        if sp:  # each rank saw its sequence shard only; the trainer sums these over tp
            dist.all_reduce(bias_grad)
        checks[fused, "row_bias"] = torch.allclose(bias_grad, row.bias.grad, **TOL)
    dist.destroy_process_group()
    return checks


def test_parallel_layers_match_plain_modules():
    for sp in (False, True):
        for result in run_distributed(_layers, 2, sp):
            assert all(result.values()), (sp, result)
