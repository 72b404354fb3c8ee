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
import triton.language as tl

from .dispatch import multiprocessors, strides
from .sep_attention_launch import LONG_SEQ, LaunchConfig, QueryTiles, launch_config, tile_rows

__all__ = ["LaunchConfig", "forward_args", "launch_backward", "launch_config", "launch_forward", "sep_attention_triton",
           "sep_attn_bwd", "sep_attn_fwd", "tile_rows"]

LOG2E = 1.4426950408889634


@triton.jit
def _rows(ptr, desc, b, hk, start, stride, lim, offs_d, BN: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr,
          MASK: tl.constexpr):
    """Rows [start, start + BN) of one head's keys or values (rows >= lim read as 0)."""
    if TMA:
        return desc.load([b, hk, start, 0]).reshape(BN, D)
    offs = start + tl.arange(0, BN)
    if MASK:
        return tl.load(ptr + offs[:, None] * stride + offs_d[None, :], mask=(offs < lim)[:, None], other=0.0)
    return tl.load(ptr + offs[:, None] * stride + offs_d[None, :])


@triton.jit
def _list_ok(pos_ptr, start, offs_m, dstart, N, BN: tl.constexpr, SEG: tl.constexpr):
    """Which list entries of the block [start, start + BN) each query sees. Entries past the tile's bound hold
    positions later than every query's window (or the padding position), so no bound check is needed."""
    p = tl.load(pos_ptr + start + tl.arange(0, BN))
    ok = p[None, :] <= offs_m[:, None] - N
    if SEG:
        ok = ok & (p[None, :] >= dstart[:, None])
    return ok


@triton.jit
def _band_ok(offs_m, offs_n, dstart, N, SEG: tl.constexpr):
    ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] - offs_n[None, :] < N)
    if SEG:
        ok = ok & (offs_n[None, :] >= dstart[:, None])
    return ok


@triton.jit
def _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr, MASK: tl.constexpr):
    """One block of keys into the running (max, sum, output) of a query tile. MASK False: every key of the
    block is visible to every query (no masking work)."""
    qk = tl.dot(q, tl.trans(k), input_precision="ieee" if IEEE else None) * qk_scale
    if MASK:
        qk = tl.where(ok, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = m_new
    if MASK:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    p = tl.exp2(qk - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee" if IEEE else None)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _dq_step(q, do, lse, delta, k, v, ok, dq, qk_scale, IEEE: tl.constexpr, MASK: tl.constexpr):
    qk = tl.dot(q, tl.trans(k), input_precision="ieee" if IEEE else None) * qk_scale
    p = tl.exp2(qk - lse[:, None])
    if MASK:
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee" if IEEE else None)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee" if IEEE else None)


@triton.jit
def _query_tile(BOUNDS, DOCS, S, N, HQ, TILES, BM: tl.constexpr, BN: tl.constexpr, HEADS_FIRST: tl.constexpr,
                SEG: tl.constexpr):
    """This program's query tile (late tiles read the longest lists: they start first) and its key ranges:
    list entries [l0, u0) and [u1, e3) masked, [u0, u1) seen by every query; band keys [lo, hi)."""
    if HEADS_FIRST:
        bh = tl.program_id(0)
        t = TILES - 1 - tl.program_id(1)
    else:
        t = TILES - 1 - tl.program_id(0)
        bh = tl.program_id(1)
    b = bh // HQ
    row = BOUNDS + b * 4 * TILES + t
    e0 = tl.load(row)  # first entry in the first query's document
    e1 = tl.load(row + TILES)  # first entry in the last query's document
    e2 = tl.load(row + 2 * TILES)  # entries older than every query's window
    e3 = tl.load(row + 3 * TILES)  # entries older than some query's window
    l0 = (e0 // BN) * BN
    u0 = tl.minimum(tl.maximum(tl.cdiv(e1, BN) * BN, l0), e3)
    u1 = tl.minimum(tl.maximum((e2 // BN) * BN, u0), e3)
    lo = t * BM - N + 1
    if SEG:
        lo = tl.maximum(lo, tl.load(DOCS + b * 2 * S + t * BM))
    lo = (tl.maximum(lo, 0) // BN) * BN
    hi = tl.minimum(t * BM + BM, S)
    return t, bh, b, bh % HQ, l0, u0, u1, e3, lo, hi


@triton.jit
def _fwd(Q, K, V, KC, VC, KD, VD, KCD, VCD, POS, BOUNDS, DOCS, O, LSE, qk_scale, S, G, N, HQ, GROUP, TILES,
         sqb, sqh, sqs, skb, skh, sks,
         BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
         HEADS_FIRST: tl.constexpr, SEG: tl.constexpr, WS: tl.constexpr):
    """One query tile of one head: O and LSE (base 2). Launched by `launch_forward`; parameters:
    - tensors: Q [b, hq, s, d]; K, V [b, hk, s, d]; KC, VC their kept rows [b, hk, G, d]; KD, VD, KCD, VCD the
      same as tensor descriptors (TMA) or tensors; POS [b, G] kept positions; BOUNDS [b, 4 * TILES] tile
      bounds; DOCS [b, 2, s] document bounds (SEG); outputs O like Q, LSE [b, hq, s] fp32;
    - scalars: qk_scale (scale * log2 e), S, G (list bucket), N (window), HQ, GROUP (hq // hk), TILES;
    - strides (batch, head, row) of Q/O (sq*) and K/V (sk*);
    - constexprs: BM, BN tiles, D head dim, IEEE (fp32 dots), TMA, HEADS_FIRST grid order, SEG, WS."""
    t, bh, b, h, l0, u0, u1, e3, lo, hi = _query_tile(BOUNDS, DOCS, S, N, HQ, TILES, BM, BN, HEADS_FIRST, SEG)
    hk = h // GROUP
    offs_m = t * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows = offs_m < S
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=rows[:, None], other=0.0)
    dstart = offs_m  # the first position of each query's document (only read with SEG)
    if SEG:
        dstart = tl.load(DOCS + b * 2 * S + offs_m, mask=rows, other=0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    kc = KC + (b * (HQ // GROUP) + hk) * G * D
    vc = VC + (b * (HQ // GROUP) + hk) * G * D
    pos = POS + b * G
    for start in range(l0, u0, BN):  # kept keys some queries see (another document, or too recent)
        ok = _list_ok(pos, start, offs_m, dstart, N, BN, SEG)
        k = _rows(kc, KCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        v = _rows(vc, VCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, IEEE, MASK=True)
    for start in tl.range(u0, u1, BN, warp_specialize=WS):  # kept keys every query of the tile sees
        k = _rows(kc, KCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        v = _rows(vc, VCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        m_i, l_i, acc = _softmax_step(q, k, v, q, m_i, l_i, acc, qk_scale, IEEE, MASK=False)
    for start in range(u1, e3, BN):
        ok = _list_ok(pos, start, offs_m, dstart, N, BN, SEG)
        k = _rows(kc, KCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        v = _rows(vc, VCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, IEEE, MASK=True)
    kb = K + b * skb + hk * skh
    vb = V + b * skb + hk * skh
    for start in range(lo, hi, BN):  # the window band
        ok = _band_ok(offs_m, start + tl.arange(0, BN), dstart, N, SEG)
        k = _rows(kb, KD, b, hk, start, sks, S, offs_d, BN, D, TMA, True)
        v = _rows(vb, VD, b, hk, start, sks, S, offs_d, BN, D, TMA, True)
        m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, IEEE, MASK=True)
    out = acc / l_i[:, None]
    tl.store(O + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=rows[:, None])
    tl.store(LSE + bh * S + offs_m, m_i + tl.log2(l_i), mask=rows)


@triton.jit
def _bwd_dq(Q, K, V, KC, VC, KD, VD, KCD, VCD, O, DO, LSE, DELTA, POS, BOUNDS, DOCS, DQ, qk_scale, scale, S, G, N,
            HQ, GROUP, TILES, sqb, sqh, sqs, skb, skh, sks,
            BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
            HEADS_FIRST: tl.constexpr, SEG: tl.constexpr, WS: tl.constexpr, ATOMIC: tl.constexpr):
    """dQ per query tile over the forward's keys; also writes delta = rowsum(dO * O), which the dK/dV kernels
    (launched after) read. Rows past S have lse 0 and dO 0: their dq is never stored. ATOMIC: the band only,
    into an fp32 buffer the list dK/dV kernel then adds its dQ to. Launched by `launch_backward`; parameters as
    `_fwd`'s, plus: O, DO (like Q), LSE (the forward's), DELTA [b, hq, s] fp32 (out), DQ (out: like Q, or fp32
    with ATOMIC), scale (dQ's factor)."""
    t, bh, b, h, l0, u0, u1, e3, lo, hi = _query_tile(BOUNDS, DOCS, S, N, HQ, TILES, BM, BN, HEADS_FIRST, SEG)
    hk = h // GROUP
    offs_m = t * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows = offs_m < S
    qo = b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :]
    q = tl.load(Q + qo, mask=rows[:, None], other=0.0)
    do = tl.load(DO + qo, mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + bh * S + offs_m, mask=rows, other=0.0)
    o = tl.load(O + qo, mask=rows[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * S + offs_m, delta, mask=rows)
    dstart = offs_m  # the first position of each query's document (only read with SEG)
    if SEG:
        dstart = tl.load(DOCS + b * 2 * S + offs_m, mask=rows, other=0)
    dq = tl.zeros([BM, D], tl.float32)
    kc = KC + (b * (HQ // GROUP) + hk) * G * D
    vc = VC + (b * (HQ // GROUP) + hk) * G * D
    pos = POS + b * G
    if ATOMIC:
        l0, u0, u1, e3 = 0, 0, 0, 0
    for start in range(l0, u0, BN):
        ok = _list_ok(pos, start, offs_m, dstart, N, BN, SEG)
        k = _rows(kc, KCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        v = _rows(vc, VCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        dq = _dq_step(q, do, lse, delta, k, v, ok, dq, qk_scale, IEEE, MASK=True)
    for start in tl.range(u0, u1, BN, warp_specialize=WS):
        k = _rows(kc, KCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        v = _rows(vc, VCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        dq = _dq_step(q, do, lse, delta, k, v, q, dq, qk_scale, IEEE, MASK=False)
    for start in range(u1, e3, BN):
        ok = _list_ok(pos, start, offs_m, dstart, N, BN, SEG)
        k = _rows(kc, KCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        v = _rows(vc, VCD, b, hk, start, D, G, offs_d, BN, D, TMA, False)
        dq = _dq_step(q, do, lse, delta, k, v, ok, dq, qk_scale, IEEE, MASK=True)
    kb = K + b * skb + hk * skh
    vb = V + b * skb + hk * skh
    for start in range(lo, hi, BN):
        ok = _band_ok(offs_m, start + tl.arange(0, BN), dstart, N, SEG)
        k = _rows(kb, KD, b, hk, start, sks, S, offs_d, BN, D, TMA, True)
        v = _rows(vb, VD, b, hk, start, sks, S, offs_d, BN, D, TMA, True)
        dq = _dq_step(q, do, lse, delta, k, v, ok, dq, qk_scale, IEEE, MASK=True)
    tl.store(DQ + qo, (dq * scale).to(DQ.dtype.element_ty), mask=rows[:, None])


@triton.jit
def _dkdv_step(k, v, dk, dv, qb, dob, lb, db, dsb, dqb, start, pos, S, N, sqs, qk_scale, scale, offs_d,
               BM: tl.constexpr, LIST: tl.constexpr, IEEE: tl.constexpr, MASK: tl.constexpr, SEG: tl.constexpr,
               ATOMIC: tl.constexpr):
    """One block of queries into a key tile's dK/dV. MASK False: every query exists and sees every key of the
    tile that exists (the others are zero rows of k and v). ATOMIC: also this block's dQ, added into the
    fp32 buffer at dqb (one add per element and block; the order of adds varies between runs)."""
    offs_m = start + tl.arange(0, BM)
    qo = offs_m[:, None] * sqs + offs_d[None, :]
    if MASK:
        rows = offs_m < S
        q = tl.load(qb + qo, mask=rows[:, None], other=0.0)
        do = tl.load(dob + qo, mask=rows[:, None], other=0.0)
        lse = tl.load(lb + offs_m, mask=rows, other=0.0)
        delta = tl.load(db + offs_m, mask=rows, other=0.0)
    else:
        q = tl.load(qb + qo)
        do = tl.load(dob + qo)
        lse = tl.load(lb + offs_m)
        delta = tl.load(db + offs_m)
    pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision="ieee" if IEEE else None) * qk_scale - lse[None, :])
    if MASK:
        if LIST:
            ok = pos[:, None] <= offs_m[None, :] - N
        else:
            ok = (pos[:, None] <= offs_m[None, :]) & (offs_m[None, :] - pos[:, None] < N)
        if SEG:
            ok = ok & (pos[:, None] >= tl.load(dsb + offs_m, mask=rows, other=0)[None, :])
        pt = tl.where(ok & rows[None, :], pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision="ieee" if IEEE else None)
    dpt = tl.dot(v, tl.trans(do), input_precision="ieee" if IEEE else None)
    ds = (pt * (dpt - delta[None, :])).to(q.dtype)
    if ATOMIC:
        dq = tl.dot(tl.trans(ds), k, input_precision="ieee" if IEEE else None) * scale
        if MASK:
            tl.atomic_add(dqb + qo, dq, mask=rows[:, None], sem="relaxed")
        else:
            tl.atomic_add(dqb + qo, dq, sem="relaxed")
    return tl.dot(ds, q, dk, input_precision="ieee" if IEEE else None), dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, POS, SLOT, DOCS, DKL, DVL, DK, DV, DQA, qk_scale, scale, S, G, N, HQ,
              GROUP, KV_HEADS, SPLIT, sqb, sqh, sqs, skb, skh, sks, sdb, sdh, sds,
              LIST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
              SEG: tl.constexpr, ATOMIC: tl.constexpr):
    """One key tile for one kv head: entries of the compact copy (LIST True, launched first; the queries
    that read a tile are split over SPLIT programs, each writing an fp32 partial) or band keys of K/V
    (LIST False), which add the SPLIT partials of their kept keys (SLOT: list index or -1). Launched twice by
    `launch_backward`; parameters:
    - tensors: Q, DO [b, hq, s, d]; K, V the keys (LIST: the compact copy KC, VC); LSE, DELTA [b, hq, s];
      POS [b, G]; SLOT [b, s]; DOCS [b, 2, s]; DKL, DVL [SPLIT, b, hk, G, d] fp32 list partials; DK, DV
      outputs (LIST: DKL, DVL); DQA the fp32 dQ buffer (ATOMIC);
    - scalars: qk_scale, scale, S, G, N, HQ, GROUP, KV_HEADS, SPLIT;
    - strides (batch, head, row) of Q/DO (sq*), K/V (sk*), DK/DV (sd*, band launch only);
    - constexprs: LIST, BM (queries per step), BN (keys per program), D, IEEE, SEG, ATOMIC."""
    bk = tl.program_id(0)  # heads fastest: every head's heaviest tiles start first
    chunk = tl.program_id(1)  # which share of a list tile's queries (0 for band tiles)
    t = tl.program_id(2)
    b = bk // KV_HEADS
    hk = bk % KV_HEADS
    offs_n = t * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    docs = DOCS + b * 2 * S
    if LIST:
        live = offs_n < G
        pos = tl.load(POS + b * G + offs_n, mask=live, other=2 * S + 2 * G)
        live = live & (pos < S)
        first = tl.min(pos, 0)
        last = tl.max(tl.where(live, pos, 0), 0)
        first_q = first + N  # earliest query that reads this list tile
        full_lo = last + N  # from here on every query reads every entry
        full_hi = S
        q_end = S
    else:
        live = offs_n < S
        pos = offs_n
        first = t * BN
        last = tl.minimum(t * BN + BN - 1, S - 1)
        first_q = t * BN
        full_lo = t * BN + BN - 1
        full_hi = t * BN + N
        q_end = tl.minimum(t * BN + BN - 1 + N, S)
    if SEG:  # queries stay in the keys' documents
        full_hi = tl.minimum(full_hi, tl.load(docs + S + tl.minimum(first, S - 1)))
        q_end = tl.minimum(q_end, tl.load(docs + S + last))
    lo = (first_q // BM) * BM
    span = tl.cdiv(tl.cdiv(tl.maximum(q_end - lo, 0), SPLIT if LIST else 1), BM) * BM
    qs = lo + chunk * span
    qe = tl.maximum(tl.minimum(qs + span, q_end), qs)
    # queries [qs, qe): masked blocks, then fully visible ones [ul, uh), then masked again
    ul = tl.minimum(tl.maximum(tl.cdiv(full_lo, BM) * BM, qs), qe)
    uh = tl.minimum(tl.maximum((tl.minimum(full_hi, S) // BM) * BM, ul), qe)
    rowk = b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :]
    k = tl.load(K + rowk, mask=live[:, None], other=0.0)
    v = tl.load(V + rowk, mask=live[:, None], other=0.0)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        qb = Q + b * sqb + h * sqh
        dob = DO + b * sqb + h * sqh
        lb = LSE + (b * HQ + h) * S
        db = DELTA + (b * HQ + h) * S
        dqb = DQA + b * sqb + h * sqh
        for start in range(qs, ul, BM):
            dk, dv = _dkdv_step(k, v, dk, dv, qb, dob, lb, db, docs, dqb, start, pos, S, N, sqs, qk_scale, scale,
                                offs_d, BM, LIST, IEEE, MASK=True, SEG=SEG, ATOMIC=ATOMIC and LIST)
        for start in range(ul, uh, BM):
            dk, dv = _dkdv_step(k, v, dk, dv, qb, dob, lb, db, docs, dqb, start, pos, S, N, sqs, qk_scale, scale,
                                offs_d, BM, LIST, IEEE, MASK=False, SEG=SEG, ATOMIC=ATOMIC and LIST)
        for start in range(uh, qe, BM):
            dk, dv = _dkdv_step(k, v, dk, dv, qb, dob, lb, db, docs, dqb, start, pos, S, N, sqs, qk_scale, scale,
                                offs_d, BM, LIST, IEEE, MASK=True, SEG=SEG, ATOMIC=ATOMIC and LIST)
    dk = dk * scale
    if LIST:
        store_mask = (offs_n < G)[:, None]
        out = chunk * (tl.num_programs(0) * G * D) + bk * G * D + offs_n[:, None] * D + offs_d[None, :]
    else:
        store_mask = live[:, None]
        slot = tl.load(SLOT + b * S + offs_n, mask=live, other=-1)
        has = (slot >= 0)[:, None]
        lrow = bk * G * D + slot[:, None] * D + offs_d[None, :]
        for c in range(SPLIT):
            dk += tl.load(DKL + c * (tl.num_programs(0) * G * D) + lrow, mask=has, other=0.0)
            dv += tl.load(DVL + c * (tl.num_programs(0) * G * D) + lrow, mask=has, other=0.0)
        out = b * sdb + hk * sdh + offs_n[:, None] * sds + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=store_mask)


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
        Q=q, K=k, V=v, KC=kc, VC=vc, KD=kd, VD=vd, KCD=kcd, VCD=vcd, POS=gpos, BOUNDS=bounds,
        DOCS=gpos if docs is None else docs,  # a stand-in without documents (SEG off: never read)
        qk_scale=scale * LOG2E, S=s, G=gpos.shape[1], N=window, HQ=hq, GROUP=hq // k.shape[1], TILES=tiles,
        **strides(("sqb", "sqh", "sqs"), q), **strides(("skb", "skh", "sks"), k),
        D=d, IEEE=q.dtype == torch.float32, SEG=docs is not None, TMA=tma, **shape.kernel_kwargs())
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
    _fwd[grid](O=o, LSE=lse, **args)
    return o, lse


def launch_backward(do, q, k, v, o, lse, index, gpos, slot, bounds, docs, window, scale, launch):
    """The backward kernels launched directly (dQ, then dK/dV for the list, then for the band). Arguments as
    `sep_attn_bwd`'s; returns (dq, dk, dv)."""
    cfg = LaunchConfig.from_ints(launch)
    b, hq, s, d = q.shape
    hk, g = k.shape[1], gpos.shape[1]
    do = do.contiguous()
    kc, vc = _compact(k, index), _compact(v, index)  # recomputed: cheaper than keeping them per layer
    seg = docs is not None
    delta = torch.empty_like(lse)
    atomic = bool(cfg.atomic)
    dq = torch.empty_like(q, dtype=torch.float32) if atomic else torch.empty_like(q)
    grid, args = _query_tile_args(q, k, v, kc, vc, gpos, bounds, docs, window, scale, cfg.dq)
    _bwd_dq[grid](O=o, DO=do, LSE=lse, DELTA=delta, DQ=dq, scale=scale, ATOMIC=atomic, **args)
    tiles = cfg.dkdv
    list_tiles = triton.cdiv(g, tiles.BN)
    split = tiles.split or _list_split(list_tiles * b * hk, s, tiles.BM, q.device)
    dkl = torch.empty(split, b, hk, g, d, dtype=torch.float32, device=k.device)
    dvl = torch.empty_like(dkl)
    common = dict(  # what both launches share, grouped as in the kernel's docstring
        Q=q, DO=do, LSE=lse, DELTA=delta, POS=gpos, SLOT=slot, DOCS=gpos if docs is None else docs, DKL=dkl,
        DVL=dvl, DQA=dq,
        qk_scale=scale * LOG2E, scale=scale, S=s, G=g, N=window, HQ=hq, GROUP=hq // hk, KV_HEADS=hk, SPLIT=split,
        **strides(("sqb", "sqh", "sqs"), q),
        D=d, IEEE=q.dtype == torch.float32, SEG=seg, ATOMIC=atomic, **tiles.kernel_kwargs())
    # grids (kv heads, split, key tiles): heads fastest. List tiles write fp32 partials (DK/DV: DKL/DVL, the
    # sd* strides unused); band tiles add them at the kept positions.
    _bwd_dkdv[(b * hk, split, list_tiles)](K=kc, V=vc, DK=dkl, DV=dvl, **strides(("skb", "skh", "sks"), kc),
                                           sdb=0, sdh=0, sds=0, LIST=True, **common)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _bwd_dkdv[(b * hk, 1, triton.cdiv(s, tiles.BN))](K=k, V=v, DK=dk, DV=dv, **strides(("skb", "skh", "sks"), k),
                                                     **strides(("sdb", "sdh", "sds"), dk), LIST=False, **common)
    return (dq.to(q.dtype) if atomic else dq), dk, dv


# The kernels behind two custom operators with a fake (meta) implementation and a registered backward:
# torch.compile, CUDA graphs and activation checkpointing see one opaque node each and never trace the
# Triton code. Every input the backward needs is an input of the forward, so it can be saved.
# `launch`: LaunchConfig.as_ints() (the schema has no records).
@torch.library.custom_op("megatron_sep::sep_attn_fwd", mutates_args=())
def sep_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, gpos: torch.Tensor,
                 slot: torch.Tensor, bounds_fwd: torch.Tensor, bounds_dq: torch.Tensor, docs: torch.Tensor | None,
                 window: int, scale: float, launch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_forward(q, k, v, index, gpos, slot, bounds_fwd, bounds_dq, docs, window, scale, launch)


@sep_attn_fwd.register_fake
def _(q, k, v, index, gpos, slot, bounds_fwd, bounds_dq, docs, window, scale, launch):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("megatron_sep::sep_attn_bwd", mutates_args=())
def sep_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, index: torch.Tensor, gpos: torch.Tensor, slot: torch.Tensor, bounds: torch.Tensor,
                 docs: torch.Tensor | None, window: int, scale: float,
                 launch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_backward(do, q, k, v, o, lse, index, gpos, slot, bounds, docs, window, scale, launch)


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
    return (q.contiguous(), k.contiguous(), v.contiguous(), plan.index, plan.gpos, plan.slot,
            plan.bounds[(window, launch.fwd.BM)], plan.bounds[(window, launch.dq.BM)], plan.docs, window, scale,
            launch.as_ints())


def sep_attention_triton(q, k, v, is_sep, init_tokens: int, window: int, scale=None, config: dict | None = None,
                         plan=None, segment_ids=None, deterministic: bool = True):
    """`plan`: the micro-batch's `SepPlan` (built here when not given, e.g. by tests and benchmarks).
    `config` overrides the tuned CONFIG (sep_attention_launch.py) per kernel, e.g. {"fwd": {"BM": 128}}
    (tests use small tiles; see `launch_config`). `deterministic` False: the list part's dQ is added with fp32
    atomics inside the dK/dV kernel instead of recomputed per query tile (fewer matmuls; gradients vary in the
    last bits between runs)."""
    d = q.shape[-1]
    if d not in (16, 32, 64, 128):
        raise ValueError(f"the Triton SepAttention kernel supports head dims 16, 32, 64 and 128, not {d}. "
                         "Fix: use backend='flex' or 'reference'")
    scale = d ** -0.5 if scale is None else scale
    launch = launch_config(config, q.shape[2], deterministic)
    if plan is None:
        from .sep_plan import build_plan
        plan = build_plan(is_sep, init_tokens, [window], "triton", segment_ids,
                          tile_rows=(launch.fwd.BM, launch.dq.BM))
    return sep_attn_fwd(*forward_args(q, k, v, plan, window, scale, launch))[0]
