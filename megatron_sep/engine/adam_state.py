"""The native engine's Adam state in the checkpoint's layout-independent form (checkpoint/state.py).

Adam state follows its parameter, keyed by the plain model's name (a tensor-parallel shard as a DTensor);
under ZeRO-1 the data-parallel shards are gathered per bucket first (over dp x cp), so the file does not
depend on dp or cp either.
"""

from __future__ import annotations

import torch

from ..checkpoint.state import unwrap as _unwrap, wrap as _wrap
from ..parallel.mappings import _ALL_GATHER
from ..parallel.params import info


def _zero_full_states(engine) -> dict:
    """Per-parameter (tp-local) Adam states assembled from the dp x cp shards of a ZeroAdamW."""
    opt, ctx = engine.opt, engine.ctx
    out = {}
    names = {p: n for n, p in engine.model.named_parameters()}
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
            out[names[p]] = {k: flats[k][o : o + p.numel()].view_as(p).clone() for k in flats}
    step = next((st["step"] for st in opt.opt.state.values()), torch.zeros(()))
    for v in out.values():
        v["step"] = step.detach().clone().cpu().float()
    return out


def _optim_name(name: str, p) -> str:
    # a pipeline's last-stage copy of the tied embedding shares the embedding's Adam state
    return "embed.weight" if info(p).pipeline_duplicate else name


def optim_state(engine) -> dict:
    ctx, params = engine.ctx, dict(engine.model.named_parameters())
    if engine.zero:
        full = _zero_full_states(engine)
    else:
        ensure_adam_state(engine)
        full = {n: {k: v for k, v in engine.opt.state[p].items()} for n, p in params.items()}
    return {
        _optim_name(n, params[n]): {
            k: (_wrap(v, params[n], ctx) if k != "step" else v) for k, v in st.items()
        }
        for n, st in full.items()
    }


def ensure_adam_state(engine) -> None:
    """Materialise empty Adam state so that DCP can load into it in place."""
    opt = engine.opt.opt if engine.zero else engine.opt
    on_device = opt.defaults.get("fused") or opt.defaults.get("capturable")
    targets = (
        [seg.master for seg in engine.opt.segments]
        if engine.zero
        else list(engine.model.parameters())
    )
    for p in targets:
        if not opt.state.get(p):
            opt.state[p] = {
                "step": torch.zeros(
                    (), dtype=torch.float32, device=p.device if on_device else "cpu"
                ),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }


def load_optim_state(engine, state: dict) -> None:
    """Write per-parameter Adam states (as returned by optim_state, after DCP filled them) back."""
    params = dict(engine.model.named_parameters())
    by_key = {_optim_name(n, p): p for n, p in params.items()}
    if not engine.zero:
        for n, st in state.items():
            dst = engine.opt.state[by_key[n]]
            for k, v in st.items():
                dst[k].copy_(_unwrap(v))
        return
    ensure_adam_state(engine)
    names = {p: _optim_name(n, p) for n, p in params.items()}
    for seg in engine.opt.segments:
        st, o = state[names[seg.param]], seg.bucket.offsets[seg.param]
        dst = engine.opt.opt.state[seg.master]
        for k in ("exp_avg", "exp_avg_sq"):
            dst[k].copy_(_unwrap(st[k]).reshape(-1)[seg.start - o : seg.end - o])
        dst["step"].copy_(st["step"])
        # masters follow the loaded weights
        seg.master.data.copy_(seg.bucket.data[seg.start : seg.end].float())
