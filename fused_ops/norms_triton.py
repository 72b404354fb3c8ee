"""Triton LayerNorm / RMSNorm, forward and backward, with an optional fused residual add.

Forward: one program per row; statistics in fp32; writes y, the summed input
(when a residual is fused) and per-row mean / rstd for the backward.
Backward: each program walks a contiguous group of rows, writes dx, and keeps
fp32 partial sums of dweight / dbias in its own row of a [programs, N] buffer;
torch sums that buffer afterwards, so the weight gradients are deterministic
(no atomics).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .dispatch import multiprocessors, plain_call


@triton.jit
def _norm_fwd(
    X,
    R,
    W,
    B,
    Y,
    S,
    MEAN,
    RSTD,
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row. Tensors: X, R (residual), W, B [N], outputs Y, S (X + R), MEAN, RSTD [rows] fp32; row strides
    stride_*; scalars N (columns), eps; constexprs: the norm, which optional inputs exist, BLOCK >= N."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(S + row * stride_s + cols, x.to(S.dtype.element_ty), mask=mask)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        tl.store(MEAN + row, mean)
        xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(
    X,
    W,
    DY,
    DX,
    DRES,
    MEAN,
    RSTD,
    DW,
    DB,
    stride_x,
    stride_dy,
    stride_dx,
    stride_dres,
    M,
    N,
    rows_per_prog,
    IS_RMS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """rows_per_prog rows from pid * rows_per_prog. Tensors: X, W, DY, DX (out), DRES (the residual branch's
    gradient, added), MEAN, RSTD, DW, DB ([programs, N] fp32 partials, out); row strides stride_*; scalars M
    (rows), N, rows_per_prog; constexprs: the norm, which optional tensors exist, BLOCK, STAGES."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_prog
    for i in tl.range(0, rows_per_prog, num_stages=STAGES):  # loads of the next rows in flight
        row = start + i
        ok = mask & ((cols * 0 + row) < M)  # the last group may run past the end
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(ok, (x - tl.load(MEAN + row, mask=row < M, other=0.0)) * rstd, 0.0)
        if HAS_W:
            dw += dy * xhat
            g = dy * w
        else:
            g = dy
        if HAS_B:
            db += dy
        c1 = tl.sum(xhat * g, axis=0) / N
        if IS_RMS:
            dx = (g - xhat * c1) * rstd
        else:
            c2 = tl.sum(g, axis=0) / N
            dx = (g - xhat * c1 - c2) * rstd
        if HAS_DRES:
            dx += tl.load(DRES + row * stride_dres + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=ok)
    if HAS_W:
        tl.store(DW + pid * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB + pid * N + cols, db, mask=mask)


class NormBwdTiles(NamedTuple):
    """One entry of the backward's tuning table (BWD)."""

    progs_per_sm: int  # programs per SM, each over a contiguous group of rows
    warps: int  # at 4096 columns; wider rows scale it (_bwd_launch)
    stages: int  # rows whose loads are in flight in the row loop (the kernel's STAGES)


class NormBwdLaunch(NamedTuple):
    """The backward's launch for one call: grid (programs,), each over rows_per_prog rows."""

    programs: int
    rows_per_prog: int
    num_warps: int
    stages: int


# Backward launch shape per norm, from a sweep on an H100 at 16384 x 4096 bf16 timed with CUDA
# graphs (benchmarks/norm_tune.py, results/2026-11-23_fused_ops_h100_norm_tune.jsonl; the sweep rebinds entries).
BWD = {
    "rms": NormBwdTiles(progs_per_sm=8, warps=8, stages=1),
    "layer": NormBwdTiles(progs_per_sm=8, warps=4, stages=2),
}

FWD_WARPS = {
    "rms": None,
    "layer": None,
}  # None: block / 512 (8 warps at 4096: 95% of copy on an H100)


def _fwd_warps(is_rms: bool, block: int) -> int:
    return FWD_WARPS["rms" if is_rms else "layer"] or min(max(block // 512, 1), 16)


def _bwd_launch(is_rms: bool, m: int, block: int, device) -> NormBwdLaunch:
    tiles = BWD["rms" if is_rms else "layer"]
    # the sweep was at 4096 columns; wider rows need proportionally more warps to avoid spills
    warps = min(16, tiles.warps * max(1, block // 4096))
    progs = max(1, min(m, tiles.progs_per_sm * multiprocessors(device)))
    rows_per = triton.cdiv(m, progs)
    return NormBwdLaunch(
        programs=triton.cdiv(m, rows_per),
        rows_per_prog=rows_per,
        num_warps=warps,
        stages=tiles.stages,
    )


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


# Custom operators (fake implementations, registered backward): torch.compile sees one node and never traces
# the Triton code (an autograd.Function around it made dynamo fall back to eager for the whole block).
@torch.library.custom_op("megatron_sep::norm_fwd", mutates_args=())
def norm_fwd(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> y, x + residual (empty without residual), mean, rstd (fp32, per row)."""
    return _norm_fwd_launch(x, residual, weight, bias, eps, is_rms)


def _norm_fwd_launch(x, residual, weight, bias, eps, is_rms):
    shape, n = x.shape, x.shape[-1]
    x2 = _rows(x, n)
    m = x2.shape[0]
    block = triton.next_power_of_2(n)
    if block > 65536:
        raise ValueError(f"hidden size {n} is above the fused norm's limit of 65536")
    y = torch.empty_like(x2)
    res = _rows(residual, n) if residual is not None else None
    s = torch.empty_like(x2) if res is not None else x2.new_empty(0)
    # RMS: unused
    mean = (torch.zeros if is_rms else torch.empty)(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    # an absent optional tensor is replaced by a stand-in its HAS_* constexpr keeps the kernel from touching
    _norm_fwd[(m,)](
        X=x2,
        R=res if res is not None else x2,
        W=weight if weight is not None else x2,
        B=bias if bias is not None else x2,
        Y=y,
        S=s if res is not None else y,
        MEAN=mean,
        RSTD=rstd,
        stride_x=x2.stride(0),
        stride_r=res.stride(0) if res is not None else 0,
        stride_y=y.stride(0),
        stride_s=s.stride(0) if res is not None else 0,
        N=n,
        eps=eps,
        IS_RMS=is_rms,
        HAS_RES=res is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        BLOCK=block,
        num_warps=_fwd_warps(is_rms, block),
    )
    return y.view(shape), (s.view(shape) if res is not None else s), mean, rstd


@norm_fwd.register_fake
def _(x, residual, weight, bias, eps, is_rms):
    m = x.numel() // x.shape[-1]
    s = (
        torch.empty_like(x, memory_format=torch.contiguous_format)
        if residual is not None
        else x.new_empty(0)
    )
    stats = x.new_empty(m, dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), s, stats, stats.clone()


@torch.library.custom_op("megatron_sep::norm_bwd", mutates_args=())
def norm_bwd(
    dy: torch.Tensor,
    ds: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dx, dweight, dbias (empty where there is no weight / bias)."""
    shape, n = x.shape, x.shape[-1]
    x2 = _rows(x, n)
    m = x2.shape[0]
    dy2 = _rows(dy, n)
    ds2 = _rows(ds, n) if ds is not None else None
    dx = torch.empty_like(x2)
    block = triton.next_power_of_2(n)
    launch = _bwd_launch(is_rms, m, block, x2.device)
    dw = (
        torch.empty(launch.programs, n, dtype=torch.float32, device=x2.device)
        if weight is not None
        else None
    )
    db = (
        torch.empty(launch.programs, n, dtype=torch.float32, device=x2.device)
        if bias is not None
        else None
    )
    # absent optional tensors: stand-ins the HAS_* constexprs keep the kernel from touching
    _norm_bwd[(launch.programs,)](
        X=x2,
        W=weight if weight is not None else x2,
        DY=dy2,
        DX=dx,
        DRES=ds2 if ds2 is not None else dy2,
        MEAN=mean,
        RSTD=rstd,
        DW=dw if dw is not None else dx,
        DB=db if db is not None else dx,
        stride_x=x2.stride(0),
        stride_dy=dy2.stride(0),
        stride_dx=dx.stride(0),
        stride_dres=ds2.stride(0) if ds2 is not None else 0,
        M=m,
        N=n,
        rows_per_prog=launch.rows_per_prog,
        IS_RMS=is_rms,
        HAS_DRES=ds2 is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        BLOCK=block,
        STAGES=launch.stages,
        num_warps=launch.num_warps,
    )
    dweight = dw.sum(0).to(weight.dtype) if weight is not None else x2.new_empty(0)
    dbias = db.sum(0).to(bias.dtype) if bias is not None else x2.new_empty(0)
    return dx.view(shape), dweight, dbias


@norm_bwd.register_fake
def _(dy, ds, x, weight, bias, mean, rstd, is_rms):
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dweight, dbias


def _norm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms = inputs
    ctx.save_for_backward(
        output[1] if residual is not None else x, weight, bias, output[2], output[3]
    )
    ctx.is_rms, ctx.has_res = is_rms, residual is not None
    ctx.has_w, ctx.has_b = weight is not None, bias is not None


def _norm_backward(ctx, dy, ds, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    ds = ds if ctx.has_res and ds is not None and ds.numel() else None
    dx, dweight, dbias = norm_bwd(dy, ds, x, weight, bias, mean, rstd, ctx.is_rms)
    return (
        dx,
        dx if ctx.has_res else None,
        dweight if ctx.has_w else None,
        dbias if ctx.has_b else None,
        None,
        None,
    )


norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup)


def norm_triton(x, weight, bias, eps, residual, is_rms):
    """Returns y, or (y, x + residual) when residual is given."""
    fwd = _norm_fwd_launch if plain_call(x, residual, weight, bias) else norm_fwd
    y, s, _, _ = fwd(x, residual, weight, bias, eps, is_rms)
    return (y, s) if residual is not None else y
