"""Learning-rate schedules (the optimizer itself is built with the parallel plan)."""

from __future__ import annotations

import math

from ..config import Config


def warmup_steps(cfg: Config) -> int:
    o = cfg.optim
    return (
        o.warmup_steps
        if o.warmup_steps is not None
        else int(round(o.warmup_fraction * cfg.train.steps))
    )


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
