"""Layout-independent state dicts for torch.distributed.checkpoint.

Every entry is keyed by the plain model's parameter name. A tensor-parallel shard
becomes a DTensor over the tp mesh (Shard on its split dim), so DCP stores the
global tensor and loads it back under any other (tp, pp, cp, dp) layout; replicated
tensors are saved once (DCP de-duplicates equal keys across ranks). Adam state
follows its parameter; under ZeRO-1 the data-parallel shards are gathered per
bucket first (over dp x cp), so the file does not depend on dp or cp either.
"""
from __future__ import annotations

import torch

from .context import ParallelContext
from .mappings import _ALL_GATHER
from .params import info
from ..checkpoint.state import unwrap as _unwrap, wrap as _wrap


def _zero_full_states(plan) -> dict:
    """Per-parameter (tp-local) Adam states assembled from the dp x cp shards of a ZeroAdamW."""
    opt, ctx = plan.opt, plan.ctx
    out = {}
    names = {p: n for n, p in plan.model.named_parameters()}
    for b in opt.sync.buckets:
        shard = b.padded // ctx.grad_size
        flats = {}
        for key in ("exp_avg", "exp_avg_sq"):
            own = torch.zeros(shard, dtype=torch.float32, device=b.grad.device)
            for seg in opt.segments:
                if seg.bucket is b and opt.opt.state.get(seg.master):
                    own[seg.in_shard] = opt.opt.state[seg.master][key]
            full = torch.empty(b.padded, dtype=torch.float32, device=b.grad.device)
            _ALL_GATHER(full, own, group=ctx.grad_group)
            flats[key] = full
        for p in b.params:
            o = b.offsets[p]
            out[names[p]] = {k: flats[k][o: o + p.numel()].view_as(p).clone() for k in flats}
    step = next((st["step"] for st in opt.opt.state.values()), torch.zeros(()))
    for v in out.values():
        v["step"] = step.detach().clone().cpu().float()
    return out


def _optim_name(name: str, p) -> str:
    # a pipeline's last-stage copy of the tied embedding shares the embedding's Adam state
    return "embed.weight" if info(p).pipeline_duplicate else name


def optim_state(plan) -> dict:
    ctx, params = plan.ctx, dict(plan.model.named_parameters())
    if plan.zero:
        full = _zero_full_states(plan)
    else:
        ensure_adam_state(plan)
        full = {n: {k: v for k, v in plan.opt.state[p].items()} for n, p in params.items()}
    return {_optim_name(n, params[n]): {k: (_wrap(v, params[n], ctx) if k != "step" else v)
                                        for k, v in st.items()} for n, st in full.items()}


def ensure_adam_state(plan) -> None:
    """Materialise empty Adam state so that DCP can load into it in place."""
    opt = plan.opt.opt if plan.zero else plan.opt
    on_device = opt.defaults.get("fused") or opt.defaults.get("capturable")
    targets = [seg.master for seg in plan.opt.segments] if plan.zero else list(plan.model.parameters())
    for p in targets:
        if not opt.state.get(p):
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                            "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def load_optim_state(plan, state: dict) -> None:
    """Write per-parameter Adam states (as returned by optim_state, after DCP filled them) back."""
    params = dict(plan.model.named_parameters())
    by_key = {_optim_name(n, p): p for n, p in params.items()}
    if not plan.zero:
        for n, st in state.items():
            dst = plan.opt.state[by_key[n]]
            for k, v in st.items():
                dst[k].copy_(_unwrap(v))
        return
    ensure_adam_state(plan)
    names = {p: _optim_name(n, p) for n, p in params.items()}
    for seg in plan.opt.segments:
        st, o = state[names[seg.param]], seg.bucket.offsets[seg.param]
        dst = plan.opt.opt.state[seg.master]
        for k in ("exp_avg", "exp_avg_sq"):
            dst[k].copy_(_unwrap(st[k]).reshape(-1)[seg.start - o: seg.end - o])
        dst["step"].copy_(st["step"])
        seg.master.data.copy_(seg.bucket.data[seg.start:seg.end].float())  # masters follow the loaded weights
