"""Apply tensor (+ sequence) parallelism to the plain GPT by module replacement."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..model import SubLLM
from ..model.dlcm import CrossAttention
from ..model.gpt import Block, Norm
from .context import ParallelContext
from .params import info, mark
from .mappings import gather_seq_whole, split_seq
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelCrossEntropy,
    VocabParallelEmbedding,
)


def apply_tensor_parallel(model, ctx: ParallelContext):
    """In place. qkv rows are grouped per kv head, so each rank's slice holds whole kv groups."""
    if ctx.tp == 1:
        return model
    if model.padded_vocab_size % ctx.tp:
        raise ConfigError(
            "parallel.tp",
            ctx.tp,
            f"does not divide the padded vocabulary {model.padded_vocab_size}",
            "use a power-of-two tp (the vocabulary is padded to a multiple of 128)",
        )
    for block in [m for m in model.modules() if isinstance(m, Block)]:  # DLCM: its backbone's too
        attn, mlp = block.attn, block.mlp
        attn.qkv = ColumnParallelLinear(attn.qkv, ctx)
        attn.out = RowParallelLinear(attn.out, ctx)
        attn.heads //= ctx.tp
        attn.kv_heads //= ctx.tp
        if mlp.gate is not None:
            mlp.gate = ColumnParallelLinear(mlp.gate, ctx)
        mlp.up = ColumnParallelLinear(mlp.up, ctx)
        mlp.down = RowParallelLinear(mlp.down, ctx)
    for xa in [m for m in model.modules() if isinstance(m, CrossAttention)]:
        xa.q, xa.k, xa.v = (ColumnParallelLinear(getattr(xa, n), ctx) for n in ("q", "k", "v"))
        xa.out = RowParallelLinear(xa.out, ctx)
        xa.heads //= ctx.tp
        xa.kv_heads //= ctx.tp
    tied = model.lm_head.weight is model.embed.weight
    model.embed = VocabParallelEmbedding(model.embed, ctx)
    model.lm_head = ColumnParallelLinear(model.lm_head, ctx)
    if tied:
        model.lm_head.weight = model.embed.weight
    model.loss = VocabParallelCrossEntropy(ctx, model.cfg.model.fused_loss)
    if ctx.sequence_parallel:
        for m in model.modules():
            if isinstance(m, Norm):
                for p in m.parameters():
                    mark(p, sequence_parallel=True)
        if isinstance(model, SubLLM):
            model.seq_shards = SeqShards(ctx.tp_group, ctx.tp)
    return model


class SeqShards:
    """SUBLLM under sequence parallelism: a level's scorer, selection and upsampling run on the whole
    sequence, alike on every tp rank (their weights get whole gradients, no sum over tp); the blocks inside
    run on shards of the kept tokens, padded to a multiple of tp."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def gather(self, x):
        return gather_seq_whole(x, self.group)

    def split(self, x):
        return split_seq(x, self.group)


def sync_sequence_parallel_grads(model, ctx: ParallelContext) -> None:
    """Norm weights (and row-parallel biases) saw only their sequence shard: sum their grads over tp."""
    if not ctx.sequence_parallel:
        return
    grads = [p.grad for p in model.parameters() if info(p).sequence_parallel and p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=ctx.tp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
