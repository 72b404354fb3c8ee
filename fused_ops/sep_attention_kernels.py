"""The SepAttention Triton kernels (the algorithm: sep_attention_triton.py's docstring). Each kernel's
docstring lists its parameters in groups: tensors, shape numbers, strides, compile-time constants; the launch
side (sep_attention_triton.py) passes every one by keyword."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _rows(
    ptr,
    desc,
    b,
    hk,
    start,
    stride,
    lim,
    offs_d,
    BN: tl.constexpr,
    D: tl.constexpr,
    TMA: tl.constexpr,
    MASK: tl.constexpr,
):
    """Rows [start, start + BN) of one head's keys or values (rows >= lim read as 0)."""
    if TMA:
        return desc.load([b, hk, start, 0]).reshape(BN, D)
    offs = start + tl.arange(0, BN)
    if MASK:
        return tl.load(
            ptr + offs[:, None] * stride + offs_d[None, :], mask=(offs < lim)[:, None], other=0.0
        )
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
def _query_tile(
    BOUNDS,
    DOCS,
    S,
    N,
    HQ,
    TILES,
    BM: tl.constexpr,
    BN: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
    SEG: tl.constexpr,
):
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
def fwd_kernel(
    Q,
    K,
    V,
    KC,
    VC,
    KD,
    VD,
    KCD,
    VCD,
    POS,
    BOUNDS,
    DOCS,
    O,
    LSE,
    qk_scale,
    S,
    G,
    N,
    HQ,
    GROUP,
    TILES,
    sqb,
    sqh,
    sqs,
    skb,
    skh,
    sks,
    BM: tl.constexpr,
    BN: tl.constexpr,
    D: tl.constexpr,
    IEEE: tl.constexpr,
    TMA: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
    SEG: tl.constexpr,
    WS: tl.constexpr,
):
    """One query tile of one head: O and LSE (base 2). Launched by `launch_forward`; parameters:
    - tensors: Q [b, hq, s, d]; K, V [b, hk, s, d]; KC, VC their kept rows [b, hk, G, d]; KD, VD, KCD, VCD the
      same as tensor descriptors (TMA) or tensors; POS [b, G] kept positions; BOUNDS [b, 4 * TILES] tile
      bounds; DOCS [b, 2, s] document bounds (SEG); outputs O like Q, LSE [b, hq, s] fp32;
    - scalars: qk_scale (scale * log2 e), S, G (list bucket), N (window), HQ, GROUP (hq // hk), TILES;
    - strides (batch, head, row) of Q/O (sq*) and K/V (sk*);
    - constexprs: BM, BN tiles, D head dim, IEEE (fp32 dots), TMA, HEADS_FIRST grid order, SEG, WS."""
    t, bh, b, h, l0, u0, u1, e3, lo, hi = _query_tile(
        BOUNDS, DOCS, S, N, HQ, TILES, BM, BN, HEADS_FIRST, SEG
    )
    hk = h // GROUP
    offs_m = t * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows = offs_m < S
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
        mask=rows[:, None],
        other=0.0,
    )
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
    tl.store(
        O + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=rows[:, None],
    )
    tl.store(LSE + bh * S + offs_m, m_i + tl.log2(l_i), mask=rows)


@triton.jit
def dq_kernel(
    Q,
    K,
    V,
    KC,
    VC,
    KD,
    VD,
    KCD,
    VCD,
    O,
    DO,
    LSE,
    DELTA,
    POS,
    BOUNDS,
    DOCS,
    DQ,
    qk_scale,
    scale,
    S,
    G,
    N,
    HQ,
    GROUP,
    TILES,
    sqb,
    sqh,
    sqs,
    skb,
    skh,
    sks,
    BM: tl.constexpr,
    BN: tl.constexpr,
    D: tl.constexpr,
    IEEE: tl.constexpr,
    TMA: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
    SEG: tl.constexpr,
    WS: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """dQ per query tile over the forward's keys; also writes delta = rowsum(dO * O), which the dK/dV kernels
    (launched after) read. Rows past S have lse 0 and dO 0: their dq is never stored. ATOMIC: the band only,
    into an fp32 buffer the list dK/dV kernel then adds its dQ to. Launched by `launch_backward`; parameters as
    `fwd_kernel`'s, plus: O, DO (like Q), LSE (the forward's), DELTA [b, hq, s] fp32 (out), DQ (out: like Q, or fp32
    with ATOMIC), scale (dQ's factor)."""
    t, bh, b, h, l0, u0, u1, e3, lo, hi = _query_tile(
        BOUNDS, DOCS, S, N, HQ, TILES, BM, BN, HEADS_FIRST, SEG
    )
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
def _dkdv_step(
    k,
    v,
    dk,
    dv,
    qb,
    dob,
    lb,
    db,
    dsb,
    dqb,
    start,
    pos,
    S,
    N,
    sqs,
    qk_scale,
    scale,
    offs_d,
    BM: tl.constexpr,
    LIST: tl.constexpr,
    IEEE: tl.constexpr,
    MASK: tl.constexpr,
    SEG: tl.constexpr,
    ATOMIC: tl.constexpr,
):
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
    pt = tl.exp2(
        tl.dot(k, tl.trans(q), input_precision="ieee" if IEEE else None) * qk_scale - lse[None, :]
    )
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
def dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    POS,
    SLOT,
    DOCS,
    DKL,
    DVL,
    DK,
    DV,
    DQA,
    qk_scale,
    scale,
    S,
    G,
    N,
    HQ,
    GROUP,
    KV_HEADS,
    SPLIT,
    sqb,
    sqh,
    sqs,
    skb,
    skh,
    sks,
    sdb,
    sdh,
    sds,
    LIST: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    D: tl.constexpr,
    IEEE: tl.constexpr,
    SEG: tl.constexpr,
    ATOMIC: tl.constexpr,
):
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
            dk, dv = _dkdv_step(
                k,
                v,
                dk,
                dv,
                qb,
                dob,
                lb,
                db,
                docs,
                dqb,
                start,
                pos,
                S,
                N,
                sqs,
                qk_scale,
                scale,
                offs_d,
                BM,
                LIST,
                IEEE,
                MASK=True,
                SEG=SEG,
                ATOMIC=ATOMIC and LIST,
            )
        for start in range(ul, uh, BM):
            dk, dv = _dkdv_step(
                k,
                v,
                dk,
                dv,
                qb,
                dob,
                lb,
                db,
                docs,
                dqb,
                start,
                pos,
                S,
                N,
                sqs,
                qk_scale,
                scale,
                offs_d,
                BM,
                LIST,
                IEEE,
                MASK=False,
                SEG=SEG,
                ATOMIC=ATOMIC and LIST,
            )
        for start in range(uh, qe, BM):
            dk, dv = _dkdv_step(
                k,
                v,
                dk,
                dv,
                qb,
                dob,
                lb,
                db,
                docs,
                dqb,
                start,
                pos,
                S,
                N,
                sqs,
                qk_scale,
                scale,
                offs_d,
                BM,
                LIST,
                IEEE,
                MASK=True,
                SEG=SEG,
                ATOMIC=ATOMIC and LIST,
            )
    dk = dk * scale
    if LIST:
        store_mask = (offs_n < G)[:, None]
        out = (
            chunk * (tl.num_programs(0) * G * D)
            + bk * G * D
            + offs_n[:, None] * D
            + offs_d[None, :]
        )
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
