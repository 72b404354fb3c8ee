"""What parallelism did to a parameter, as one typed record on it (read by the grad norm, the gradient
reductions and sharded checkpoints) instead of loose attributes and name matching."""

from __future__ import annotations

from dataclasses import dataclass, replace

_ATTR = "parallel_info"


@dataclass(frozen=True)
class ParamInfo:
    tp_dim: int | None = (
        None  # split over tensor-parallel ranks along this dim; None: replicated over tp
    )
    sequence_parallel: bool = False  # sees only its sequence shard: its gradient is summed over tp
    pipeline_duplicate: bool = False  # the last stage's copy of the tied embedding: counted once

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_dim is not None


PLAIN = ParamInfo()


def info(p) -> ParamInfo:
    return getattr(p, _ATTR, PLAIN)


def mark(p, **fields) -> None:
    setattr(p, _ATTR, replace(info(p), **fields))
