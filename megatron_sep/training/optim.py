"""AdamW with Megatron's weight-decay grouping, and the learning-rate schedules."""
from __future__ import annotations

import math

import torch

from ..config import Config


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """No weight decay on biases, norm weights and other 1-D parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)


def warmup_steps(cfg: Config) -> int:
    o = cfg.optim
    return o.warmup_steps if o.warmup_steps is not None else int(round(o.warmup_fraction * cfg.train.steps))


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the decay schedule."""
    o, total = cfg.optim, cfg.train.steps
    warm = warmup_steps(cfg)
    if step < warm:
        return o.lr * (step + 1) / warm
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "wsd":  # warmup, stable, then linear decay over the last wsd_decay_fraction
        decay_start = max(warm, total - int(round(o.wsd_decay_fraction * total)))
        if step < decay_start:
            return o.lr
        frac = (step - decay_start) / max(1, total - decay_start)
        return o.lr - (o.lr - o.min_lr) * min(1.0, frac)
    frac = min(1.0, (step - warm) / max(1, total - warm))
    if o.schedule == "linear":
        return o.lr - (o.lr - o.min_lr) * frac
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * frac))
