"""Pipeline parallelism: split the plain GPT into stages and run GPipe, 1F1B or interleaved 1F1B.

Each rank keeps the GPT object but only its layers (a ModuleDict keyed by the
global layer index, so parameter names stay those of the plain model), the
embedding on the first stage and the final norm + head on the last. With
`virtual_stages` v a rank holds v model chunks; global chunk g = k * pp + rank.
Activations (sequence shards under sequence or context parallelism) travel with
batch_isend_irecv; sends are non-blocking and waited at the end of the step, so a
schedule only has to receive in the order its peer sends.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .context import ParallelContext
from .params import info, mark
from .stages import split_layers
from .ulysses import shard_seq


class Pipeline:
    def __init__(self, model, ctx: ParallelContext, schedule: str, virtual_stages: int):
        self.ctx, self.model = ctx, model
        self.vp = virtual_stages if schedule == "interleaved" else 1
        self.schedule = schedule
        chunks = split_layers(len(model.layers), ctx.pp * self.vp, model.stage_starts())
        self.my_chunks = [k * ctx.pp + ctx.pp_rank for k in range(self.vp)]  # global chunk ids
        self.chunk_layers = {g: chunks[g] for g in self.my_chunks}
        self.last_chunk = ctx.pp * self.vp - 1
        tied = model.lm_head.weight is model.embed.weight
        owned = [i for g in self.my_chunks for i in chunks[g]]
        if ctx.pp > 1:  # keyed by global index, so parameter names stay the plain model's
            model.layers = nn.ModuleDict({str(i): model.layers[i] for i in owned})
            # e.g. SUBLLM: this rank's levels
            model.keep_stage_parts([chunks[g] for g in self.my_chunks])
        has_first, has_last = 0 in self.my_chunks, self.last_chunk in self.my_chunks
        # the head keeps its own copy, kept equal by grad sync
        if has_last and tied and not has_first:
            model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone())
            mark(
                model.lm_head.weight,
                tp_dim=info(model.embed.weight).tp_dim,
                pipeline_duplicate=True,
            )
        if not has_first:
            model.embed = None
        if not has_last:
            model.final_norm = model.lm_head = None
        self.tied_param = None
        if tied and ctx.pp > 1:
            self.tied_param = (
                model.embed.weight if has_first else (model.lm_head.weight if has_last else None)
            )
        self.tied_group = ctx.embedding_group

    # ---- one chunk ---------------------------------------------------------------------------
    def run_chunk(self, g: int, x, tokens, labels, batch, engine):
        """The model's own embed / blocks / head code, for the layers of chunk g. Under context
        parallelism tokens, labels and positions are this rank's slice of the sequence (`batch` stays
        whole: attention runs over the full sequence)."""
        m, ctx = self.model, self.ctx
        pos = shard_seq(torch.arange(tokens.shape[1], device=tokens.device), ctx, dim=0)
        # the whole model: through its forward, so module hooks (ZeRO-3) see it
        if g == 0 == self.last_chunk:
            return engine.forward(shard_seq(tokens, ctx), shard_seq(labels, ctx), pos, batch)
        if g == 0:
            x = m.embed_tokens(shard_seq(tokens, ctx))
        x = m.run_layers(x, pos, batch, self.chunk_layers[g])
        return m.head(x, shard_seq(labels, ctx)) if g == self.last_chunk else x

    def _peer(self, g: int, step: int) -> int:
        """Global rank holding global chunk g + step."""
        return self.ctx.pp_peer(((g + step) % self.ctx.pp) - self.ctx.pp_rank)

    def _recv(self, shape, src):
        t = torch.empty(shape, dtype=torch.float32, device=self.ctx.device)
        for req in dist.batch_isend_irecv([dist.P2POp(dist.irecv, t, src)]):
            req.wait()
        return t

    def _send(self, t, dst):
        t = t.detach().float().contiguous()
        self.pending += [(t, r) for r in dist.batch_isend_irecv([dist.P2POp(dist.isend, t, dst)])]

    # ---- schedules ---------------------------------------------------------------------------
    def order(self, micros: int, forward_only: bool):
        """The (kind, chunk, microbatch) actions of this rank, in execution order."""
        ctx, vp = self.ctx, self.vp
        if forward_only or self.schedule == "gpipe":
            fwd = [("F", g, mb) for mb in range(micros) for g in self.my_chunks]
            bwd = (
                []
                if forward_only
                else [
                    ("B", g, mb) for mb in reversed(range(micros)) for g in reversed(self.my_chunks)
                ]
            )
            return fwd + bwd
        total = micros * vp
        if vp == 1:
            warm = min(ctx.pp - ctx.pp_rank - 1, micros)
            fwd = [("F", self.my_chunks[0], mb) for mb in range(micros)]
            bwd = [("B", self.my_chunks[0], mb) for mb in range(micros)]
        else:  # Megatron's interleaved order: groups of pp microbatches, chunk by chunk
            group = ctx.pp * vp

            def unit(k, forward):
                v = (k % group) // ctx.pp
                v = v if forward else vp - 1 - v
                return self.my_chunks[v], (k // group) * ctx.pp + k % ctx.pp

            warm = min((ctx.pp - ctx.pp_rank - 1) * 2 + (vp - 1) * ctx.pp, total)
            fwd = [("F", *unit(k, True)) for k in range(total)]
            bwd = [("B", *unit(k, False)) for k in range(total)]
        out = fwd[:warm]
        for i in range(total - warm):
            out += [fwd[warm + i], bwd[i]]
        return out + bwd[total - warm :]

    def run(self, micro_batches, engine, forward_only: bool = False):
        """micro_batches: list of (tokens, labels, batch). Returns the summed loss (last stage; else 0).
        Each microbatch's loss is scaled by 1 / len(micro_batches) before backward, as without pp.
        The engine runs the whole model's forward (one stage), the loss's backward, and learns when the
        step's last backward starts (`before_last_backward`: data-parallel gradient hooks)."""
        ctx, micros = self.ctx, len(micro_batches)
        self.pending = []
        saved, total = {}, torch.zeros((), device=ctx.device)
        tokens0 = micro_batches[0][0]
        # the sequence slice each rank holds
        split = ctx.cp * (ctx.tp if ctx.sequence_parallel else 1)
        shape = (tokens0.shape[0], tokens0.shape[1] // split, self.model.cfg.model.hidden_size)
        actions = self.order(micros, forward_only)
        for i, (kind, g, mb) in enumerate(actions):
            tokens, labels, batch = micro_batches[mb]
            if kind == "F":
                x = None
                if g != 0:
                    x = self._recv(shape, self._peer(g, -1)).requires_grad_(not forward_only)
                with torch.set_grad_enabled(not forward_only):
                    y = self.run_chunk(g, x, tokens, labels, batch, engine)
                if g == self.last_chunk:
                    y = y / micros
                    total += y.detach()
                else:
                    self._send(y, self._peer(g, 1))
                if not forward_only:
                    saved[(g, mb)] = (x, y)
            else:
                x, y = saved.pop((g, mb))
                if self._is_last_backward(actions, i):
                    engine.before_last_backward()
                if g == self.last_chunk:
                    engine.backward(y)
                else:
                    grad = self._recv(y.shape, self._peer(g, 1))
                    torch.autograd.backward(y, grad.to(y.dtype))
                if g != 0:
                    self._send(x.grad, self._peer(g, -1))
        for _, req in self.pending:
            req.wait()
        self.pending = []
        return total

    @staticmethod
    def _is_last_backward(actions, i) -> bool:
        return all(kind != "B" for kind, _, _ in actions[i + 1 :])

    def sync_tied_grads(self) -> None:
        """Embedding (first stage) and head (last stage) are one weight: sum their grads."""
        p = self.tied_param
        if p is not None:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g, group=self.tied_group)
            p.grad = g
