"""Triton LayerNorm / RMSNorm, forward and backward, with an optional fused residual add.

Forward: one program per row; statistics in fp32; writes y, the summed input
(when a residual is fused) and per-row mean / rstd for the backward.
Backward: each program walks a contiguous group of rows, writes dx, and keeps
fp32 partial sums of dweight / dbias in its own row of a [programs, N] buffer;
torch sums that buffer afterwards, so the weight gradients are deterministic
(no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_fwd(X, R, W, B, Y, S, MEAN, RSTD, stride_x, stride_r, stride_y, stride_s, N, eps,
              IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              BLOCK: tl.constexpr):
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
def _norm_bwd(X, W, DY, DX, DRES, MEAN, RSTD, DW, DB, stride_x, stride_dy, stride_dx, stride_dres, M, N,
              rows_per_prog, IS_RMS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_W: tl.constexpr,
              HAS_B: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
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


# Backward launch shape per norm, from a sweep on an H100 at 16384 x 4096 bf16 timed with CUDA
# graphs (benchmarks/norm_tune.py, results/norm_tune_h100.jsonl).
BWD = {"rms": {"progs_per_sm": 8, "warps": 8, "stages": 1},
       "layer": {"progs_per_sm": 8, "warps": 4, "stages": 2}}

FWD_WARPS = {"rms": None, "layer": None}  # None: block / 512 (8 warps at 4096: 95% of copy on an H100)


def _bwd_shape(is_rms: bool, block: int):
    cfg = BWD["rms" if is_rms else "layer"]
    # the sweep was at 4096 columns; wider rows need proportionally more warps to avoid spills
    warps = min(16, cfg["warps"] * max(1, block // 4096))
    return cfg["progs_per_sm"], warps, cfg["stages"]


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


class _NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms):
        shape, n = x.shape, x.shape[-1]
        x2 = _rows(x, n)
        m = x2.shape[0]
        block = triton.next_power_of_2(n)
        if block > 65536:
            raise ValueError(f"hidden size {n} is above the fused norm's limit of 65536")
        y = torch.empty_like(x2)
        res = _rows(residual, n) if residual is not None else None
        s = torch.empty_like(x2) if res is not None else None
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        _norm_fwd[(m,)](x2, res if res is not None else x2, weight if weight is not None else x2,
                        bias if bias is not None else x2, y, s if s is not None else y, mean, rstd,
                        x2.stride(0), res.stride(0) if res is not None else 0, y.stride(0),
                        s.stride(0) if s is not None else 0, n, eps, IS_RMS=is_rms, HAS_RES=res is not None,
                        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=block,
                        num_warps=FWD_WARPS["rms" if is_rms else "layer"] or min(max(block // 512, 1), 16))
        ctx.save_for_backward(s if s is not None else x2, weight, bias, mean, rstd)
        ctx.shape, ctx.is_rms, ctx.has_res = shape, is_rms, residual is not None
        ctx.mark_non_differentiable(mean)
        out_s = s.view(shape) if s is not None else None
        return y.view(shape), out_s

    @staticmethod
    def backward(ctx, dy, ds):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = _rows(dy, n)
        ds2 = _rows(ds, n) if (ctx.has_res and ds is not None) else None
        dx = torch.empty_like(x2)
        block = triton.next_power_of_2(n)
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 4
        per_sm, warps, stages = _bwd_shape(ctx.is_rms, block)
        progs = max(1, min(m, per_sm * sms))
        rows_per = triton.cdiv(m, progs)
        progs = triton.cdiv(m, rows_per)
        dw = torch.empty(progs, n, dtype=torch.float32, device=x2.device) if weight is not None else None
        db = torch.empty(progs, n, dtype=torch.float32, device=x2.device) if bias is not None else None
        _norm_bwd[(progs,)](x2, weight if weight is not None else x2, dy2, dx, ds2 if ds2 is not None else dy2,
                            mean, rstd, dw if dw is not None else dx, db if db is not None else dx,
                            x2.stride(0), dy2.stride(0), dx.stride(0), ds2.stride(0) if ds2 is not None else 0,
                            m, n, rows_per, IS_RMS=ctx.is_rms, HAS_DRES=ds2 is not None,
                            HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=block,
                            STAGES=stages, num_warps=warps)
        dweight = dw.sum(0).to(weight.dtype) if weight is not None else None
        dbias = db.sum(0).to(bias.dtype) if bias is not None else None
        dx = dx.view(ctx.shape)
        return dx, (dx if ctx.has_res else None), dweight, dbias, None, None


def norm_triton(x, weight, bias, eps, residual, is_rms):
    """Returns y, or (y, x + residual) when residual is given."""
    y, s = _NormFn.apply(x, residual, weight, bias, eps, is_rms)
    return (y, s) if residual is not None else y
