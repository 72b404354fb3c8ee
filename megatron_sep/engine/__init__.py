"""Engines: what updates the weights of a parallelized model. Native (AdamW / ZeRO-1), DeepSpeed and FSDP2 answer
one protocol; the Trainer and the checkpoint store use nothing else of them."""

from __future__ import annotations

from typing import Protocol

import torch

from ..config import Config
from ..parallel.context import ParallelContext
from ..parallel.parallelize import Parallelized


class Engine(Protocol):
    model: torch.nn.Module  # as this rank holds it (parameter names are the plain model's)
    ctx: ParallelContext
    cfg: Config
    describe: str  # for the run's layout line, e.g. " zero1"

    def forward_backward(self, micro_batches, forward_only: bool = False) -> torch.Tensor:
        """The pipeline schedule over these micro-batches; the summed loss (last stage)."""

    def forward(self, tokens, labels, position_ids, batch): ...  # the whole model (one stage)

    def backward(self, loss) -> None: ...

    def before_last_backward(self) -> None: ...  # the step's last backward starts next

    def step(self, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """Reduce, clip, update: (gradient norm, updated); a non-finite loss or norm skips the update."""

    def set_lr(self, lr: float) -> None: ...

    def given_config(
        self,
    ) -> str | None: ...  # a configuration of the engine's own (DeepSpeed's JSON)

    def weights_finite(self) -> bool: ...  # collective

    def state_dict(
        self,
    ) -> dict: ...  # {"model": ..., "optim": ...} keyed by the plain model's names

    def load_state_dict(self, read, with_optimizer: bool) -> None:
        """read(state) fills a state dict in place from a checkpoint, resharded to this layout."""


def build_engine(part: Parallelized, cfg: Config, ctx: ParallelContext) -> Engine:
    if cfg.parallel.engine == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(part, cfg, ctx)
    if cfg.parallel.engine == "fsdp2":
        from .fsdp2 import FSDP2Engine

        return FSDP2Engine(part, cfg, ctx)
    from .native import NativeEngine

    return NativeEngine(part, cfg, ctx)


__all__ = ["Engine", "build_engine"]
