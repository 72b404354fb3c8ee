"""SepAttention in Triton: forward and backward whose work grows with (#kept keys + window) per query.

Per sequence, the kept keys (initial tokens and separators) are a sorted list of
positions. For a query tile, the list entries older than every query's window are
read (gathered rows of K/V) and, in the same online softmax, the dense band of
the window; query i sees list entry p iff p <= i - n and band key j iff
0 <= i - j < n, so the two parts never overlap. The backward recomputes with the
saved log-sum-exp: dQ per query tile over the same keys; dK/dV per key tile for
the band and per list tile for the kept keys (then added at their positions: one
entry per position, so no two writes meet). Grouped-query heads are summed inside
the dK/dV programs, so no atomics are used anywhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_step(q, kb, vb, kpos, kmask, ok, m_i, l_i, acc, scale, sks, offs_d, IEEE: tl.constexpr):
    """One block of keys at positions kpos into the running (max, sum, output) of a query tile."""
    kt = tl.load(kb + kpos[None, :] * sks + offs_d[:, None], mask=kmask[None, :], other=0.0)
    qk = tl.dot(q, kt, input_precision="ieee" if IEEE else None) * scale
    qk = tl.where(ok, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    pij = tl.exp(qk - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    v = tl.load(vb + kpos[:, None] * sks + offs_d[None, :], mask=kmask[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(pij.to(v.dtype), v, input_precision="ieee" if IEEE else None)
    return m_new, l_i * alpha + tl.sum(pij, 1), acc


@triton.jit
def _dq_step(q, do, lse, delta, kb, vb, kpos, kmask, ok, dq, scale, sks, offs_d, IEEE: tl.constexpr):
    k = tl.load(kb + kpos[:, None] * sks + offs_d[None, :], mask=kmask[:, None], other=0.0)
    v = tl.load(vb + kpos[:, None] * sks + offs_d[None, :], mask=kmask[:, None], other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision="ieee" if IEEE else None) * scale
    pij = tl.where(ok, tl.exp(qk - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee" if IEEE else None)
    ds = pij * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision="ieee" if IEEE else None)


@triton.jit
def _fwd(Q, K, V, POS, AHI, O, LSE, scale, S, G, N, HQ, GROUP, TILES,
         sqb, sqh, sqs, skb, skh, sks,
         BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    offs_m = t * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows = offs_m < S
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=rows[:, None], other=0.0)
    kb = K + b * skb + hk * skh
    vb = V + b * skb + hk * skh
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    a_hi = tl.load(AHI + b * TILES + t)
    for start in range(0, a_hi, BN):  # kept keys older than the tile's windows
        offs_c = start + tl.arange(0, BN)
        live = offs_c < a_hi
        p = tl.load(POS + b * G + offs_c, mask=live, other=0)
        ok = (p[None, :] <= offs_m[:, None] - N) & live[None, :]
        m_i, l_i, acc = _softmax_step(q, kb, vb, p, live, ok, m_i, l_i, acc, scale, sks, offs_d, IEEE)
    lo = tl.maximum(t * BM - N + 1, 0)
    lo = (lo // BN) * BN
    hi = tl.minimum(t * BM + BM, S)
    for start in range(lo, hi, BN):  # the window band
        offs_n = start + tl.arange(0, BN)
        ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] - offs_n[None, :] < N)
        m_i, l_i, acc = _softmax_step(q, kb, vb, offs_n, offs_n < S, ok, m_i, l_i, acc, scale, sks, offs_d, IEEE)
    out = acc / l_i[:, None]
    tl.store(O + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=rows[:, None])
    tl.store(LSE + bh * S + offs_m, m_i + tl.log(l_i), mask=rows)


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, POS, AHI, DQ, scale, S, G, N, HQ, GROUP, TILES,
            sqb, sqh, sqs, skb, skh, sks,
            BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    offs_m = t * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows = offs_m < S
    qo = b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :]
    q = tl.load(Q + qo, mask=rows[:, None], other=0.0)
    do = tl.load(DO + qo, mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + bh * S + offs_m, mask=rows, other=0.0)
    delta = tl.load(DELTA + bh * S + offs_m, mask=rows, other=0.0)
    kb = K + b * skb + hk * skh
    vb = V + b * skb + hk * skh
    dq = tl.zeros([BM, D], tl.float32)
    a_hi = tl.load(AHI + b * TILES + t)
    for start in range(0, a_hi, BN):
        offs_c = start + tl.arange(0, BN)
        live = offs_c < a_hi
        p = tl.load(POS + b * G + offs_c, mask=live, other=0)
        ok = (p[None, :] <= offs_m[:, None] - N) & live[None, :] & rows[:, None]
        dq = _dq_step(q, do, lse, delta, kb, vb, p, live, ok, dq, scale, sks, offs_d, IEEE)
    lo = tl.maximum(t * BM - N + 1, 0)
    lo = (lo // BN) * BN
    hi = tl.minimum(t * BM + BM, S)
    for start in range(lo, hi, BN):
        offs_n = start + tl.arange(0, BN)
        ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] - offs_n[None, :] < N) & rows[:, None]
        dq = _dq_step(q, do, lse, delta, kb, vb, offs_n, offs_n < S, ok, dq, scale, sks, offs_d, IEEE)
    tl.store(DQ + qo, (dq * scale).to(DQ.dtype.element_ty), mask=rows[:, None])


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, POS, DK, DV, scale, S, G, N, HQ, GROUP, KV_HEADS,
              sqb, sqh, sqs, skb, skh, sks, sdb, sdh, sds,
              LIST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    """One key tile: band keys (LIST False) or kept-list entries (LIST True) for one kv head."""
    t = tl.program_id(0)
    bk = tl.program_id(1)
    b = bk // KV_HEADS
    hk = bk % KV_HEADS
    offs_n = t * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    if LIST:
        live = offs_n < G
        pos = tl.load(POS + b * G + offs_n, mask=live, other=2 * S + 2 * G)
        live = live & (pos < S)
        first_q = tl.min(pos, 0) + N  # earliest query that reads this list tile
        q_end = S
    else:
        live = offs_n < S
        pos = offs_n
        first_q = t * BN
        q_end = tl.minimum(t * BN + BN - 1 + N, S)
    rowk = b * skb + hk * skh + pos[:, None] * sks + offs_d[None, :]
    k = tl.load(K + rowk, mask=live[:, None], other=0.0)
    v = tl.load(V + rowk, mask=live[:, None], other=0.0)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    lo = (first_q // BM) * BM
    for g in range(0, GROUP):
        h = hk * GROUP + g
        for start in range(lo, q_end, BM):
            offs_m = start + tl.arange(0, BM)
            rows = offs_m < S
            qo = b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :]
            q = tl.load(Q + qo, mask=rows[:, None], other=0.0)
            do = tl.load(DO + qo, mask=rows[:, None], other=0.0)
            lse = tl.load(LSE + (b * HQ + h) * S + offs_m, mask=rows, other=0.0)
            delta = tl.load(DELTA + (b * HQ + h) * S + offs_m, mask=rows, other=0.0)
            kq = tl.dot(k, tl.trans(q), input_precision="ieee" if IEEE else None) * scale  # [BN, BM]
            if LIST:
                ok = (pos[:, None] <= offs_m[None, :] - N) & live[:, None] & rows[None, :]
            else:
                ok = ((pos[:, None] <= offs_m[None, :]) & (offs_m[None, :] - pos[:, None] < N)
                      & live[:, None] & rows[None, :])
            pt = tl.where(ok, tl.exp(kq - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee" if IEEE else None)
            dpt = tl.dot(v, tl.trans(do), input_precision="ieee" if IEEE else None)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee" if IEEE else None)
    out = b * sdb + hk * sdh + offs_n[:, None] * sds + offs_d[None, :]
    store_mask = (offs_n < G)[:, None] if LIST else live[:, None]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=store_mask)


def _plan(is_sep, init_tokens, window, s, bm):
    from .sep_attention import kept_keys
    from .sep_attention_flex import gather_plan

    index, gpos = gather_plan(kept_keys(is_sep, init_tokens))
    tiles = triton.cdiv(s, bm)
    tile_last = torch.arange(tiles, device=is_sep.device) * bm + bm - 1
    a_hi = torch.searchsorted(gpos.contiguous(), (tile_last - window).expand(gpos.shape[0], tiles).contiguous(),
                              right=True).to(torch.int32)
    return index.contiguous(), gpos.to(torch.int32).contiguous(), a_hi.contiguous(), tiles


class _SepAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, is_sep, init_tokens, window, scale, bm, bn):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, hq, s, d = q.shape
        hk = k.shape[1]
        index, gpos, a_hi, tiles = _plan(is_sep, init_tokens, window, s, bm)
        o = torch.empty_like(q)
        lse = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
        ieee = q.dtype == torch.float32
        _fwd[(tiles, b * hq)](q, k, v, gpos, a_hi, o, lse, scale, s, gpos.shape[1], window, hq, hq // hk, tiles,
                              *q.stride()[:3], *k.stride()[:3], BM=bm, BN=bn, D=d, IEEE=ieee)
        ctx.save_for_backward(q, k, v, o, lse, index, gpos, a_hi)
        ctx.args = (scale, window, bm, bn, tiles)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, index, gpos, a_hi = ctx.saved_tensors
        scale, window, bm, bn, tiles = ctx.args
        do = do.contiguous()
        b, hq, s, d = q.shape
        hk, g = k.shape[1], gpos.shape[1]
        ieee = q.dtype == torch.float32
        delta = (do.float() * o.float()).sum(-1).contiguous()
        dq = torch.empty_like(q)
        _bwd_dq[(tiles, b * hq)](q, k, v, do, lse, delta, gpos, a_hi, dq, scale, s, g, window, hq, hq // hk, tiles,
                                 *q.stride()[:3], *k.stride()[:3], BM=bm, BN=bn, D=d, IEEE=ieee)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _bwd_dkdv[(triton.cdiv(s, bn), b * hk)](q, k, v, do, lse, delta, gpos, dk, dv, scale, s, g, window, hq,
                                                hq // hk, hk, *q.stride()[:3], *k.stride()[:3], *dk.stride()[:3],
                                                LIST=False, BM=bm, BN=bn, D=d, IEEE=ieee)
        dkl = torch.empty(b, hk, g, d, dtype=torch.float32, device=k.device)
        dvl = torch.empty_like(dkl)
        _bwd_dkdv[(triton.cdiv(g, bn), b * hk)](q, k, v, do, lse, delta, gpos, dkl, dvl, scale, s, g, window, hq,
                                                hq // hk, hk, *q.stride()[:3], *k.stride()[:3], *dkl.stride()[:3],
                                                LIST=True, BM=bm, BN=bn, D=d, IEEE=ieee)
        idx = index[:, None, :, None].expand(b, hk, g, d)  # unique positions per row; padding adds zeros
        dk = dk.float().scatter_add_(2, idx, dkl).to(k.dtype)
        dv = dv.float().scatter_add_(2, idx, dvl).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def sep_attention_triton(q, k, v, is_sep, init_tokens: int, window: int, scale=None, block_m: int = 64,
                         block_n: int = 64):
    d = q.shape[-1]
    if d not in (16, 32, 64, 128):
        raise ValueError(f"the Triton SepAttention kernel supports head dims 16, 32, 64 and 128, not {d}. "
                         "Fix: use backend='flex' or 'reference'")
    scale = d ** -0.5 if scale is None else scale
    return _SepAttnFn.apply(q, k, v, is_sep, init_tokens, window, scale, block_m, block_n)
