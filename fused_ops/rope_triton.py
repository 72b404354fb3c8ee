"""Triton RoPE: q and k of one token rotated in one program, forward and backward.

Half-split convention on the first `rotary_dim` channels of each head; the rest
is copied through. Angles are pos * base^(-2i/rotary_dim), formed in fp32 in the
kernel from the position ids, so no cos/sin cache is read. Inputs may be strided
views of the fused qkv projection (the last dim must be contiguous); outputs are
contiguous [b, s, h, d]. The backward is the same kernel rotating by -angle.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .dispatch import plain_call, strides


@triton.jit
def _rope_heads(
    X,
    Y,
    sxb,
    sxs,
    sxh,
    syb,
    sys,
    syh,
    b,
    t,
    H,
    cos,
    sin,
    half,
    offs_h,
    offs_r,
    offs_p,
    D: tl.constexpr,
    ROT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    hm = offs_h[:, None] < H
    rm = hm & (offs_r[None, :] < half)
    xb = X + b * sxb + t * sxs + offs_h[:, None] * sxh
    yb = Y + b * syb + t * sys + offs_h[:, None] * syh
    x1 = tl.load(xb + offs_r[None, :], mask=rm, other=0.0).to(tl.float32)
    x2 = tl.load(xb + half + offs_r[None, :], mask=rm, other=0.0).to(tl.float32)
    tl.store(yb + offs_r[None, :], (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=rm)
    tl.store(yb + half + offs_r[None, :], (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=rm)
    if ROT < D:  # partial rotary: copy the tail
        pm = hm & (offs_p[None, :] < D - ROT)
        tail = tl.load(xb + ROT + offs_p[None, :], mask=pm, other=0.0)
        tl.store(yb + ROT + offs_p[None, :], tail, mask=pm)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    POS,
    sqb,
    sqs,
    sqh,
    skb,
    sks,
    skh,
    sob,
    sos,
    soh,
    skob,
    skos,
    skoh,
    spb,
    sps,
    S,
    HQ,
    HK,
    log2_base,
    sign,
    D: tl.constexpr,
    ROT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One token (program b * S + t), all its q and k heads. Tensors: Q [b, s, HQ, d], K [b, s, HK, d], outputs
    QO, KO, POS [b or 1, s]; strides (batch, token, head) of Q, K, QO, KO (sq*, sk*, so*, sko*) and POS (spb 0:
    one row of positions for the whole batch); scalars S, HQ, HK, log2_base, sign (-1: the backward);
    constexprs D, ROT (rotated channels), BLOCK_H >= heads, BLOCK_R >= ROT / 2, BLOCK_P >= D - ROT."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    t = pid % S
    half = ROT // 2
    offs_r = tl.arange(0, BLOCK_R)
    offs_h = tl.arange(0, BLOCK_H)
    offs_p = tl.arange(0, BLOCK_P)
    pos = tl.load(POS + b * spb + t * sps).to(tl.float32)
    inv_freq = tl.exp2(-(2.0 * offs_r.to(tl.float32) / ROT) * log2_base)
    angle = pos * inv_freq
    cos = tl.cos(angle)[None, :]
    sin = sign * tl.sin(angle)[None, :]
    _rope_heads(
        Q,
        QO,
        sqb,
        sqs,
        sqh,
        sob,
        sos,
        soh,
        b,
        t,
        HQ,
        cos,
        sin,
        half,
        offs_h,
        offs_r,
        offs_p,
        D,
        ROT,
        BLOCK_H,
        BLOCK_P,
    )
    _rope_heads(
        K,
        KO,
        skb,
        sks,
        skh,
        skob,
        skos,
        skoh,
        b,
        t,
        HK,
        cos,
        sin,
        half,
        offs_h,
        offs_r,
        offs_p,
        D,
        ROT,
        BLOCK_H,
        BLOCK_P,
    )


class RopeTiles(NamedTuple):
    """The kernel's blocks for one head layout (one program per token)."""

    BLOCK_H: int  # heads (q and k alike)
    BLOCK_R: int  # rotated pairs
    BLOCK_P: int  # channels copied through (partial rotary)
    num_warps: int

    @classmethod
    def for_heads(cls, hq: int, hk: int, d: int, rotary_dim: int) -> RopeTiles:
        block_h = triton.next_power_of_2(max(hq, hk))
        block_r = triton.next_power_of_2(rotary_dim // 2)
        return cls(
            BLOCK_H=block_h,
            BLOCK_R=block_r,
            BLOCK_P=triton.next_power_of_2(max(d - rotary_dim, 1)),
            num_warps=4 if block_h * block_r <= 2048 else 8,
        )


def _launch(q, k, pos, rotary_dim, base, sign):
    b, s, hq, d = q.shape
    hk = k.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    qo = torch.empty(b, s, hq, d, dtype=q.dtype, device=q.device)
    ko = torch.empty(b, s, hk, d, dtype=k.dtype, device=k.device)
    pos2 = pos if pos.dim() == 2 else pos[None, :]
    tiles = RopeTiles.for_heads(hq, hk, d, rotary_dim)
    _rope_kernel[(b * s,)](
        Q=q,
        K=k,
        QO=qo,
        KO=ko,
        POS=pos2,
        **strides(("sqb", "sqs", "sqh"), q),
        **strides(("skb", "sks", "skh"), k),
        **strides(("sob", "sos", "soh"), qo),
        **strides(("skob", "skos", "skoh"), ko),
        spb=pos2.stride(0) if pos2.shape[0] > 1 else 0,
        sps=pos2.stride(1),
        S=s,
        HQ=hq,
        HK=hk,
        log2_base=math.log2(base),
        sign=sign,
        D=d,
        ROT=rotary_dim,
        BLOCK_H=tiles.BLOCK_H,
        BLOCK_R=tiles.BLOCK_R,
        BLOCK_P=tiles.BLOCK_P,
        num_warps=tiles.num_warps,
    )
    return qo, ko


@torch.library.custom_op("megatron_sep::rope", mutates_args=())
def rope(
    q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, rotary_dim: int, base: float, sign: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k rotated by sign x angle (the backward is the same rotation by -angle); contiguous outputs."""
    return _launch(q, k, pos, rotary_dim, base, sign)


@rope.register_fake
def _(q, k, pos, rotary_dim, base, sign):
    return q.new_empty(q.shape), k.new_empty(k.shape)  # new_empty is contiguous


def _rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.rotary_dim, ctx.base, ctx.sign = inputs[3], inputs[4], inputs[5]


def _rope_backward(ctx, dq, dk):
    (pos,) = ctx.saved_tensors
    dq_in, dk_in = rope(dq, dk, pos, ctx.rotary_dim, ctx.base, -ctx.sign)
    return dq_in, dk_in, None, None, None, None


rope.register_autograd(_rope_backward, setup_context=_rope_setup)


def apply_rope_triton(q, k, position_ids, rotary_dim, base):
    if rotary_dim % 2 or rotary_dim > q.shape[-1]:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head dim {q.shape[-1]}")
    if plain_call(q, k):
        return _launch(q, k, position_ids, rotary_dim, float(base), 1.0)
    return rope(q, k, position_ids, rotary_dim, float(base), 1.0)
