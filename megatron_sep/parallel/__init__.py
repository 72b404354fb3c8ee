"""Megatron-style parallelism applied to the plain model: tensor (+ sequence), pipeline, data."""

from .context import ParallelContext, init_parallel, resolve_layout, shutdown

__all__ = ["ParallelContext", "init_parallel", "resolve_layout", "shutdown"]
