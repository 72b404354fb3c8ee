"""SepAttention in Triton: forward and backward whose work grows with (#kept keys + window) per query.

Per sequence, the kept keys (initial tokens and separators) are a sorted list of
positions, and their K/V rows are copied once into compact [b, hk, G, d] tensors.
For a query tile, the list entries older than every query's window are read as
contiguous blocks of that copy and, in the same online softmax, the dense band of
the window; query i sees list entry p iff p <= i - n and band key j iff
0 <= i - j < n, so the two parts never overlap. With documents (segment_ids), a key
must also lie in the query's document: list blocks inside every query's document and
window stay unmasked, the rest are masked. The backward recomputes with the saved
log-sum-exp: dQ per query tile over the same keys; dK/dV per key tile for the band and
per list tile for the kept keys (heads-fastest grid, so every head's heaviest list
tiles start first; on short sequences a list tile's queries split over two programs
whose fp32 partials the band programs add at the kept positions: one entry per
position, so no two writes meet). Grouped-query heads are summed inside the dK/dV
programs: no atomics anywhere, so gradients are bitwise reproducible. Softmax runs in
base 2. From LONG_SEQ on, the forward and dQ kernels read key/value blocks through
Hopper tensor descriptors (TMA).
"""

from __future__ import annotations

import torch
import triton

from .dispatch import multiprocessors, strides
from .sep_attention_kernels import LOG2E, dkdv_kernel, dq_kernel, fwd_kernel
from .sep_attention_launch import LONG_SEQ, LaunchConfig, QueryTiles, launch_config, tile_rows

__all__ = [
    "LaunchConfig",
    "forward_args",
    "launch_backward",
    "launch_config",
    "launch_forward",
    "sep_attention_triton",
    "sep_attn_bwd",
    "sep_attn_fwd",
    "tile_rows",
]


def _list_split(programs, s, bm, device):
    """How many programs share the queries of one list tile. With few list tiles (short sequences) each reads
    almost every query and the SMs idle: two programs per tile gave 1.54x vs 1.37x SDPA at 4K (H200); from
    16K on, with the heaviest tiles of every head launched first, one program per tile is as fast or faster
    (the split's fp32 partials cost more than the tail they remove: 6.27x vs 6.21x with 2, 6.15x with 3 at 64K)."""
    return max(1, min(triton.cdiv(4 * multiprocessors(device), programs), s // (8 * bm), 2))


def _compact(x, index):
    b, h, _, d = x.shape
    return torch.gather(x, 2, index[:, None, :, None].expand(b, h, index.shape[1], d)).contiguous()


def _tma(on: int, device, s) -> bool:
    """Tensor descriptors where the chip has the copy engine (Hopper on) or under the interpreter, for
    sequences long enough to pay for building them (H200: forward 0.43 vs 0.49 ms at 16K, but 0.26 vs 0.13 ms
    of plain-launch time at 4K)."""
    on = bool(on) and (s >= LONG_SEQ or device.type != "cuda")  # descriptors: ~30 us host each
    return on and (device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0))


def _descriptors(tma, bn, *tensors):
    """Hopper tensor descriptors over [b, h, rows, d] tensors, one [BN, d] block per load; with TMA off, the
    tensors themselves (the kernels then load through pointers)."""
    if not tma:
        return tensors
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor.from_tensor(t, [1, 1, bn, t.shape[-1]]) for t in tensors)


def _query_tile_args(q, k, v, kc, vc, gpos, bounds, docs, window, scale, shape: QueryTiles):
    """(grid, keyword arguments) the forward and dQ kernels share; each adds its own outputs."""
    b, hq, s, d = q.shape
    tma = _tma(shape.TMA, q.device, s)
    tiles = triton.cdiv(s, shape.BM)
    kd, vd, kcd, vcd = _descriptors(tma, shape.BN, k, v, kc, vc)
    args = dict(  # tensors; shape scalars; strides; constexprs and launch options (as in the kernels' docstrings)
        Q=q,
        K=k,
        V=v,
        KC=kc,
        VC=vc,
        KD=kd,
        VD=vd,
        KCD=kcd,
        VCD=vcd,
        POS=gpos,
        BOUNDS=bounds,
        DOCS=gpos if docs is None else docs,  # a stand-in without documents (SEG off: never read)
        qk_scale=scale * LOG2E,
        S=s,
        G=gpos.shape[1],
        N=window,
        HQ=hq,
        GROUP=hq // k.shape[1],
        TILES=tiles,
        **strides(("sqb", "sqh", "sqs"), q),
        **strides(("skb", "skh", "sks"), k),
        D=d,
        IEEE=q.dtype == torch.float32,
        SEG=docs is not None,
        TMA=tma,
        **shape.kernel_kwargs(),
    )
    return shape.grid(tiles, b * hq), args


def launch_forward(q, k, v, index, gpos, slot, bounds_fwd, bounds_dq, docs, window, scale, launch):
    """The forward kernel launched directly: no custom op, no autograd (plain eager calls and host-time
    probes). Arguments as `sep_attn_fwd`'s (`forward_args`); returns (o, lse)."""
    cfg = LaunchConfig.from_ints(launch)
    b, hq, s, _ = q.shape
    kc, vc = _compact(k, index), _compact(v, index)
    o = torch.empty_like(q)
    lse = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
    grid, args = _query_tile_args(q, k, v, kc, vc, gpos, bounds_fwd, docs, window, scale, cfg.fwd)
    fwd_kernel[grid](O=o, LSE=lse, **args)
    return o, lse


def launch_backward(do, q, k, v, o, lse, index, gpos, slot, bounds, docs, window, scale, launch):
    """The backward kernels launched directly (dQ, then dK/dV for the list, then for the band). Arguments as
    `sep_attn_bwd`'s; returns (dq, dk, dv)."""
    cfg = LaunchConfig.from_ints(launch)
    b, hq, s, d = q.shape
    hk, g = k.shape[1], gpos.shape[1]
    do = do.contiguous()
    # recomputed: cheaper than keeping them per layer
    kc, vc = (_compact(k, index), _compact(v, index))
    seg = docs is not None
    delta = torch.empty_like(lse)
    atomic = bool(cfg.atomic)
    dq = torch.empty_like(q, dtype=torch.float32) if atomic else torch.empty_like(q)
    grid, args = _query_tile_args(q, k, v, kc, vc, gpos, bounds, docs, window, scale, cfg.dq)
    dq_kernel[grid](O=o, DO=do, LSE=lse, DELTA=delta, DQ=dq, scale=scale, ATOMIC=atomic, **args)
    tiles = cfg.dkdv
    list_tiles = triton.cdiv(g, tiles.BN)
    split = tiles.split or _list_split(list_tiles * b * hk, s, tiles.BM, q.device)
    dkl = torch.empty(split, b, hk, g, d, dtype=torch.float32, device=k.device)
    dvl = torch.empty_like(dkl)
    common = dict(  # what both launches share, grouped as in the kernel's docstring
        Q=q,
        DO=do,
        LSE=lse,
        DELTA=delta,
        POS=gpos,
        SLOT=slot,
        DOCS=gpos if docs is None else docs,
        DKL=dkl,
        DVL=dvl,
        DQA=dq,
        qk_scale=scale * LOG2E,
        scale=scale,
        S=s,
        G=g,
        N=window,
        HQ=hq,
        GROUP=hq // hk,
        KV_HEADS=hk,
        SPLIT=split,
        **strides(("sqb", "sqh", "sqs"), q),
        D=d,
        IEEE=q.dtype == torch.float32,
        SEG=seg,
        ATOMIC=atomic,
        **tiles.kernel_kwargs(),
    )
    # grids (kv heads, split, key tiles): heads fastest. List tiles write fp32 partials (DK/DV: DKL/DVL, the
    # sd* strides unused); band tiles add them at the kept positions.
    dkdv_kernel[(b * hk, split, list_tiles)](
        K=kc,
        V=vc,
        DK=dkl,
        DV=dvl,
        **strides(("skb", "skh", "sks"), kc),
        sdb=0,
        sdh=0,
        sds=0,
        LIST=True,
        **common,
    )
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dkdv_kernel[(b * hk, 1, triton.cdiv(s, tiles.BN))](
        K=k,
        V=v,
        DK=dk,
        DV=dv,
        **strides(("skb", "skh", "sks"), k),
        **strides(("sdb", "sdh", "sds"), dk),
        LIST=False,
        **common,
    )
    return (dq.to(q.dtype) if atomic else dq), dk, dv


# The kernels behind two custom operators with a fake (meta) implementation and a registered backward:
# torch.compile, CUDA graphs and activation checkpointing see one opaque node each and never trace the
# Triton code. Every input the backward needs is an input of the forward, so it can be saved.
# `launch`: LaunchConfig.as_ints() (the schema has no records).
@torch.library.custom_op("megatron_sep::sep_attn_fwd", mutates_args=())
def sep_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    gpos: torch.Tensor,
    slot: torch.Tensor,
    bounds_fwd: torch.Tensor,
    bounds_dq: torch.Tensor,
    docs: torch.Tensor | None,
    window: int,
    scale: float,
    launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_forward(
        q, k, v, index, gpos, slot, bounds_fwd, bounds_dq, docs, window, scale, launch
    )


@sep_attn_fwd.register_fake
def _(q, k, v, index, gpos, slot, bounds_fwd, bounds_dq, docs, window, scale, launch):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("megatron_sep::sep_attn_bwd", mutates_args=())
def sep_attn_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    index: torch.Tensor,
    gpos: torch.Tensor,
    slot: torch.Tensor,
    bounds: torch.Tensor,
    docs: torch.Tensor | None,
    window: int,
    scale: float,
    launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_backward(
        do, q, k, v, o, lse, index, gpos, slot, bounds, docs, window, scale, launch
    )


@sep_attn_bwd.register_fake
def _(do, q, k, v, o, lse, index, gpos, slot, bounds, docs, window, scale, launch):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, index, gpos, slot, _, bounds_dq, docs, window, scale, launch = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], index, gpos, slot, bounds_dq, docs)
    ctx.args = (window, scale, launch)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, index, gpos, slot, bounds, docs = ctx.saved_tensors
    dq, dk, dv = sep_attn_bwd(do, q, k, v, o, lse, index, gpos, slot, bounds, docs, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


sep_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def forward_args(q, k, v, plan, window: int, scale: float, launch: LaunchConfig) -> tuple:
    """The arguments of `sep_attn_fwd` (and `launch_forward`) for one call: q, k, v contiguous, the plan's
    tensors for this window and launch's tile heights, then window, scale and the launch as ints."""
    return (
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        plan.index,
        plan.gpos,
        plan.slot,
        plan.bounds[(window, launch.fwd.BM)],
        plan.bounds[(window, launch.dq.BM)],
        plan.docs,
        window,
        scale,
        launch.as_ints(),
    )


def sep_attention_triton(
    q,
    k,
    v,
    is_sep,
    init_tokens: int,
    window: int,
    scale=None,
    config: dict | None = None,
    plan=None,
    segment_ids=None,
    deterministic: bool = True,
):
    """`plan`: the micro-batch's `SepPlan` (built here when not given, e.g. by tests and benchmarks).
    `config` overrides the tuned CONFIG (sep_attention_launch.py) per kernel, e.g. {"fwd": {"BM": 128}}
    (tests use small tiles; see `launch_config`). `deterministic` False: the list part's dQ is added with fp32
    atomics inside the dK/dV kernel instead of recomputed per query tile (fewer matmuls; gradients vary in the
    last bits between runs)."""
    d = q.shape[-1]
    if d not in (16, 32, 64, 128):
        raise ValueError(
            f"the Triton SepAttention kernel supports head dims 16, 32, 64 and 128, not {d}. "
            "Fix: use backend='flex' or 'reference'"
        )
    scale = d**-0.5 if scale is None else scale
    launch = launch_config(config, q.shape[2], deterministic)
    if plan is None:
        from .sep_plan import build_plan

        plan = build_plan(
            is_sep,
            init_tokens,
            [window],
            "triton",
            segment_ids,
            tile_rows=(launch.fwd.BM, launch.dq.BM),
        )
    return sep_attn_fwd(*forward_args(q, k, v, plan, window, scale, launch))[0]
