"""Layout-independent state dicts for torch.distributed.checkpoint.

Every entry is keyed by the plain model's parameter name. A tensor-parallel shard becomes a DTensor over the
tp mesh (Shard on its split dim), so DCP stores the global tensor and loads it back under any other
(tp, pp, cp, dp) layout; replicated tensors are saved once (DCP de-duplicates equal keys across ranks).
Adam state follows its parameter under `optim.<name>` (the engines build it; `fresh_adam_state` is the
state of an optimizer that has not stepped yet, for checkpoints written without one).
"""

from __future__ import annotations

import torch

from ..parallel.context import ParallelContext
from ..parallel.params import info


def wrap(t: torch.Tensor, p, ctx: ParallelContext):
    tp_dim = info(p).tp_dim if p is not None else None
    if ctx.tp > 1 and tp_dim is not None:
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(t, ctx.mesh["tp"], [Shard(tp_dim)], run_check=False)
    return t


def unwrap(t):
    return t.to_local() if hasattr(t, "to_local") else t


def model_state(model, ctx: ParallelContext) -> dict:
    params = dict(model.named_parameters(remove_duplicate=False))  # tied weights under both names
    return {name: wrap(t, params.get(name), ctx) for name, t in model.state_dict().items()}


def load_model_state(model, state: dict) -> None:
    model.load_state_dict({k: unwrap(v) for k, v in state.items()})


def fresh_adam_state(model) -> dict:
    """AdamW's per-parameter state before its first step, in the layout the engines save."""
    return {
        n: {
            "step": torch.zeros(()),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
        for n, p in model.named_parameters()
    }


class WeightsOnly:
    """One process's whole model as a checkpoint holder: loads weights, saves them with a fresh optimizer
    state (an imported model that trains from step 0). Builds no optimizer and no process group."""

    def __init__(self, model, cfg):
        self.model, self.cfg, self.ctx = model, cfg, ParallelContext()

    def state_dict(self) -> dict:
        return {"model": model_state(self.model, self.ctx), "optim": fresh_adam_state(self.model)}

    def load_state_dict(self, read, with_optimizer: bool) -> None:
        if with_optimizer:
            raise ValueError("WeightsOnly loads weights only (with_optimizer=False)")
        state = {"model": model_state(self.model, self.ctx)}
        read(state)
        load_model_state(self.model, state["model"])
