"""Turn the plain model into the part this rank holds, in one fixed order: tensor (+ sequence), context,
pipeline split, device, activation checkpointing, fp8. Owns no optimizer (the engines do: engine/).
Compiling the blocks comes last, after an engine wrapped the model (`compile_blocks`): DeepSpeed's ZeRO-3
hooks then stay outside the compiled code."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch.nn as nn

from ..config import Config
from ..model import DLCM
from . import fp8
from .context import ParallelContext
from .mappings import sum_over
from .pipeline import Pipeline
from .tensor import apply_tensor_parallel
from .ulysses import apply_context_parallel


@dataclass
class Parallelized:
    model: nn.Module  # this rank's part; parameter names are the plain model's
    pipe: Pipeline  # the schedule over this rank's stages (pp = 1: one stage, the same code)
    notes: list[str] = field(default_factory=list)  # what the transforms did, for the run's log

    @property
    def blocks(self) -> list[nn.Module]:
        return self.model.blocks()  # this rank's, in order


def parallelize(model, cfg: Config, ctx: ParallelContext) -> Parallelized:
    model = apply_context_parallel(apply_tensor_parallel(model, ctx), ctx)
    if isinstance(model, DLCM) and ctx.dp > 1:  # the global parser's statistics over the dp batch
        model.parser_sum = partial(sum_over, group=ctx.dp_group)
    p = cfg.parallel
    # DeepSpeed's engine holds the whole model (parallel.pp = 1)
    one_stage = p.engine == "deepspeed"
    pipe = Pipeline(
        model, ctx, "1f1b" if one_stage else p.schedule, 1 if one_stage else p.virtual_stages
    )
    # the engine moves it to the device (DeepSpeed as it partitions)
    out = Parallelized(model, pipe)
    for block in out.blocks:  # before compile, so the recomputation is part of the compiled block
        block.set_recompute(cfg.train.activation_checkpointing)
    if cfg.train.precision == "fp8":  # after tensor parallelism (shards), before compile
        done, kept = fp8.convert(out.blocks)
        out.notes.append(
            f"fp8: {done} linear layers in float8 (torchao, tensorwise scales)"
            + (
                f"; kept in bf16 (a dimension not a multiple of 16): {', '.join(kept)}"
                if kept
                else ""
            )
        )
    return out


def compile_blocks(blocks: list[nn.Module], static_shapes: bool) -> None:
    """torch.compile per block, in place: parameter names and the pipeline's layer dict stay as they are."""
    for block in blocks:
        block.compile(dynamic=False if static_shapes else None)
