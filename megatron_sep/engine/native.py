"""The native engine: AdamW (or ZeRO-1 over dp x cp), gradient reduction in buckets, clipping by the global
norm and the non-finite skip, around a model that parallel/parallelize.py already transformed."""

from __future__ import annotations

import math

import torch

from ..checkpoint.state import load_model_state, model_state
from ..config import Config
from ..parallel.context import ParallelContext
from ..parallel.data import GradSync, ZeroAdamW, global_grad_norm
from ..parallel.parallelize import Parallelized
from ..parallel.tensor import sync_sequence_parallel_grads
from .adam_state import load_optim_state, optim_state


def decays(p) -> bool:
    """Megatron's grouping: no weight decay on biases and norm weights (1-D parameters)."""
    return p.dim() >= 2


def lr_scales(model) -> dict[int, float]:
    """Each parameter's learning-rate multiplier by id: the model's `lr_scale(name, p)` hook (1 in the plain
    model; DLCM's decoupled muP scales its backbone)."""
    return {id(p): model.lr_scale(n, p) for n, p in model.named_parameters()}


def decay_groups(params, weight_decay: float, scales: dict[int, float] | None = None) -> list[dict]:
    """AdamW parameter groups: weight decay on the matrices only (both engines); a parameter with a
    learning-rate multiplier goes to a group carrying it as `lr_scale` (set_lr applies it)."""
    scales = scales or {}
    keys = sorted({scales.get(id(p), 1.0) for p in params} - {1.0})
    groups = []
    for scale in [1.0, *keys]:
        for decay in (True, False):
            mine = [p for p in params if decays(p) == decay and scales.get(id(p), 1.0) == scale]
            if scale == 1.0 or mine:  # the two base groups always (their order is the state's)
                group = {"params": mine, "weight_decay": weight_decay if decay else 0.0}
                groups.append(group if scale == 1.0 else {**group, "lr_scale": scale})
    return groups


class TorchOptimEngine:
    """What the native and FSDP2 engines share: the schedule's hooks around `self.pipe` and `self.model`,
    and learning rates into a torch optimizer's groups (each group's `lr_scale` applied)."""

    def given_config(self) -> str | None:
        return None  # no configuration of its own beyond ours

    def forward_backward(self, micro_batches, forward_only: bool = False) -> torch.Tensor:
        return self.pipe.run(micro_batches, self, forward_only)

    def forward(self, tokens, labels, position_ids, batch):
        return self.model(tokens, labels, position_ids, batch)

    def backward(self, loss) -> None:
        loss.backward()

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)


class NativeEngine(TorchOptimEngine):
    """The model as this rank holds it, its optimizer, and the gradient reduction around a step."""

    def __init__(self, part: Parallelized, cfg: Config, ctx: ParallelContext):
        self.ctx, self.cfg, self.pipe = ctx, cfg, part.pipe
        self.model = part.model.to(ctx.device)
        o, p = cfg.optim, cfg.parallel
        params = list(self.model.parameters())
        self.zero = p.zero == 1 and ctx.grad_size > 1
        manual = [self.pipe.tied_param] if self.pipe.tied_param is not None else []
        self.sync = (
            GradSync(params, ctx, p.bucket_mb, self.zero, manual) if ctx.grad_size > 1 else None
        )
        if self.zero:
            self.opt = ZeroAdamW(
                self.sync,
                decays,
                o.lr,
                (o.beta1, o.beta2),
                o.eps,
                o.weight_decay,
                lr_scales(self.model),
            )
        else:
            groups = decay_groups(params, o.weight_decay, lr_scales(self.model))
            # fused on CPU too: its grad_scale / found_inf inputs carry clipping and the non-finite skip
            self.opt = torch.optim.AdamW(
                groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True
            )

    @property
    def describe(self) -> str:
        return " zero1" if self.zero else ""

    def before_last_backward(self) -> None:
        if self.sync is not None:
            self.sync.enabled = True

    def step(self, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """Finish gradient reduction, clip by the global norm, update. Returns (norm, updated): a non-finite
        norm, or a non-finite `loss` on any rank, drops the update so the weights stay as they were."""
        self.pipe.sync_tied_grads()
        if self.sync is not None:
            self.sync.finish()
        sync_sequence_parallel_grads(self.model, self.ctx)
        if self.zero:
            pairs = self.opt.shard_grads()
        else:
            pairs = [(p.grad, p) for p in self.model.parameters()]
        norm = global_grad_norm(pairs, self.ctx, sharded_over_dp=self.zero, loss=loss)
        clip = self.cfg.optim.clip_grad
        if not self.zero:
            # No host sync before the update: fused AdamW divides the grads by grad_scale (the clipping) and
            # drops the whole update when found_inf is set, in its own pass. The host reads the norm after.
            self.opt.grad_scale = ((norm + 1e-6) / clip).clamp(min=1.0) if clip > 0 else None
            self.opt.found_inf = (~norm.isfinite()).float()
            self.opt.step()
            del self.opt.grad_scale, self.opt.found_inf
            self.opt.zero_grad(set_to_none=True)
            return norm, math.isfinite(norm.item())
        value = norm.item()
        if not math.isfinite(value):
            self.opt.zero_grad(set_to_none=True)
            return norm, False
        self.opt.step(min(1.0, clip / (value + 1e-6)) if clip > 0 else 1.0)
        self.opt.zero_grad(set_to_none=True)
        return norm, True

    def weights_finite(self) -> bool:
        """Collective: no rank holds a NaN or inf weight."""
        finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all()
        bad = (~finite).float().reshape(1)  # one host sync for the whole model
        if self.ctx.world > 1:
            torch.distributed.all_reduce(bad)
        return bad.item() == 0.0

    # ---- checkpoints (checkpoint/store.py) ---------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": model_state(self.model, self.ctx), "optim": optim_state(self)}

    def load_state_dict(self, read, with_optimizer: bool) -> None:
        """read(state) fills a state dict in place from the checkpoint (DCP, resharded to this layout)."""
        state = {"model": model_state(self.model, self.ctx)}
        if with_optimizer:
            state["optim"] = optim_state(self)
        read(state)
        load_model_state(self.model, state["model"])
        if with_optimizer:
            load_optim_state(self, state["optim"])
