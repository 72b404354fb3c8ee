"""Launch shapes of the SepAttention Triton kernels: typed records and the tuned tables.

Three kernels (`sep_attention_triton.py`), each with its own record:
- forward and dQ: one program per query tile and query head (`QueryTiles`);
- dK/dV: one program per key tile and kv head (`KeyTiles`).
`LaunchConfig` holds the three and the backward's dQ mode. The custom ops' schema has no records, so it
crosses the op boundary as a flat int list (`as_ints` / `from_ints`, the only place that knows the order).
NamedTuples: built on every call, and cheaper to build than frozen dataclasses (host time binds eager decoding).
"""

from __future__ import annotations

from typing import NamedTuple

from .sep_plan import BLOCK


class QueryTiles(NamedTuple):
    """Forward or dQ: BM queries per program, keys read BN rows at a time."""

    BM: int
    BN: int  # must divide the plan's BLOCK: list blocks are read unmasked
    num_warps: int
    num_stages: int
    TMA: int = 0  # 1: key/value blocks through Hopper tensor descriptors (from LONG_SEQ on)
    HEADS_FIRST: int = (
        0  # 1: grid (heads, tiles), the heaviest tile of every head first; else (tiles, heads)
    )
    WS: int = 0  # 1: warp-specialized loop over the list blocks every query of the tile sees

    def kernel_kwargs(self) -> dict:
        """The constexprs and launch options the kernel takes as is (TMA is resolved per call)."""
        return dict(
            BM=self.BM,
            BN=self.BN,
            HEADS_FIRST=self.HEADS_FIRST,
            WS=self.WS,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )

    def grid(self, tiles: int, heads: int) -> tuple[int, int]:
        return (heads, tiles) if self.HEADS_FIRST else (tiles, heads)


class KeyTiles(NamedTuple):
    """dK/dV: BN keys per program, queries read BM rows at a time."""

    BM: int
    BN: int
    num_warps: int
    num_stages: int
    split: int = 0  # programs sharing one list tile's queries; 0: chosen per call (see _list_split)

    def kernel_kwargs(self) -> dict:
        return dict(BM=self.BM, BN=self.BN, num_warps=self.num_warps, num_stages=self.num_stages)


class LaunchConfig(NamedTuple):
    fwd: QueryTiles
    dq: QueryTiles
    dkdv: KeyTiles
    atomic: int = (
        0  # 1: the list part's dQ added with fp32 atomics in the dK/dV kernel (not deterministic)
    )

    def as_ints(self) -> list[int]:
        """The flat int list the custom ops take (their schema has no records)."""
        return [*self.fwd, *self.dq, *self.dkdv, self.atomic]

    @classmethod
    def from_ints(cls, ints) -> LaunchConfig:
        return cls(
            QueryTiles._make(ints[:_NQ]),
            QueryTiles._make(ints[_NQ : 2 * _NQ]),
            KeyTiles._make(ints[2 * _NQ : 2 * _NQ + _NK]),
            *ints[2 * _NQ + _NK :],
        )

    def as_dict(self) -> dict:
        """Per kernel, field -> value (JSON records of benchmarks)."""
        return {name: getattr(self, name)._asdict() for name in KERNELS}


KERNELS = ("fwd", "dq", "dkdv")
_NQ, _NK = len(QueryTiles._fields), len(KeyTiles._fields)


# Tuned on an H200 (benchmarks/sep_attention_kernel.py --tune, which rebinds CONFIG while it sweeps).
CONFIG = LaunchConfig(
    fwd=QueryTiles(BM=64, BN=64, num_warps=4, num_stages=3, TMA=1),
    dq=QueryTiles(BM=128, BN=64, num_warps=8, num_stages=3, TMA=1),
    dkdv=KeyTiles(BM=64, BN=128, num_warps=8, num_stages=3),
)
LONG_SEQ = 8192  # shorter sequences: no tensor descriptors, smaller dK/dV tiles (SHORT)
# H200, 4K, 10% separators: fwd+bwd 0.355 ms with these dK/dV tiles vs 0.396 with the long-sequence ones
# (at 64K: 18.9 vs 18.0 ms); benchmarks/results/2026-12-01_sep_attention_kernel_h200.md
SHORT = {"dkdv": KeyTiles(BM=32, BN=64, num_warps=4, num_stages=3)}


def launch_config(
    config: dict | None = None, s: int | None = None, deterministic: bool = True
) -> LaunchConfig:
    """CONFIG (SHORT on top for sequences below LONG_SEQ), then the caller's overrides per kernel, e.g.
    {"fwd": {"BM": 128}, "dkdv": {"split": 2}}. A field a kernel does not have is an error."""
    short = s is not None and s < LONG_SEQ
    cfg = CONFIG._replace(**SHORT) if short else CONFIG
    if config:
        unknown = set(config) - set(KERNELS)
        if unknown:
            raise ValueError(
                f"SepAttention launch config: unknown kernels {sorted(unknown)}; use {KERNELS}"
            )
        cfg = cfg._replace(
            **{
                name: getattr(cfg, name)._replace(**{k: int(v or 0) for k, v in fields.items()})
                for name, fields in config.items()
            }
        )
    cfg = cfg._replace(atomic=int(not deterministic))
    for name in ("fwd", "dq"):  # list blocks are read unmasked: they must tile the list's bucket
        if BLOCK % getattr(cfg, name).BN:
            raise ValueError(f"SepAttention {name} BN={getattr(cfg, name).BN} must divide {BLOCK}")
    return cfg


def tile_rows(config: dict | None = None) -> tuple[int, int]:
    """The query-tile heights (forward, dQ) a plan needs bounds for."""
    cfg = launch_config(config)
    return cfg.fwd.BM, cfg.dq.BM
