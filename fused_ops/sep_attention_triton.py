"""SepAttention in Triton: forward and backward whose work grows with (#kept keys + window) per query.

Per sequence, the kept keys (initial tokens and separators) are a sorted list of
positions, and their K/V rows are copied once into compact [b, hk, G, d] tensors.
For a query tile, the list entries older than every query's window are read as
contiguous blocks of that copy and, in the same online softmax, the dense band of
the window; query i sees list entry p iff p <= i - n and band key j iff
0 <= i - j < n, so the two parts never overlap. The backward recomputes with the
saved log-sum-exp: dQ per query tile over the same keys; dK/dV per key tile for
the band and per list tile for the kept keys (a list tile's queries split over a few
programs on short sequences; the band programs add those fp32 partials at the kept
positions: one entry per position, so no two writes meet). Grouped-query heads are
summed inside the dK/dV programs, so no atomics are used anywhere. Softmax runs in
base 2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import multiprocessors

LOG2E = 1.4426950408889634

# launch shapes per kernel (tuned on an H100: benchmarks/sep_attention_kernel.py --tune)
CONFIG = {"fwd": {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3},
          "dq": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
          "dkdv": {"BM": 32, "BN": 64, "num_warps": 4, "num_stages": 3}}


@triton.jit
def _softmax_step(q, kb, vb, rows, stride, kmask, ok, m_i, l_i, acc, qk_scale, offs_d, IEEE: tl.constexpr,
                  MASK: tl.constexpr):
    """One block of keys (rows of kb/vb) into the running (max, sum, output) of a query tile.
    MASK False: every key of the block exists and is visible to every query (no masking work)."""
    if MASK:
        kt = tl.load(kb + rows[None, :] * stride + offs_d[:, None], mask=kmask[None, :], other=0.0)
    else:
        kt = tl.load(kb + rows[None, :] * stride + offs_d[:, None])
    qk = tl.dot(q, kt, input_precision="ieee" if IEEE else None) * qk_scale
    if MASK:
        qk = tl.where(ok, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    pij = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    if MASK:
        v = tl.load(vb + rows[:, None] * stride + offs_d[None, :], mask=kmask[:, None], other=0.0)
    else:
        v = tl.load(vb + rows[:, None] * stride + offs_d[None, :])
    acc = acc * alpha[:, None] + tl.dot(pij.to(v.dtype), v, input_precision="ieee" if IEEE else None)
    return m_new, l_i * alpha + tl.sum(pij, 1), acc


@triton.jit
def _dq_step(q, do, lse, delta, kb, vb, rows, stride, kmask, ok, dq, qk_scale, offs_d, IEEE: tl.constexpr,
             MASK: tl.constexpr):
    if MASK:
        k = tl.load(kb + rows[:, None] * stride + offs_d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(vb + rows[:, None] * stride + offs_d[None, :], mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(kb + rows[:, None] * stride + offs_d[None, :])
        v = tl.load(vb + rows[:, None] * stride + offs_d[None, :])
    qk = tl.dot(q, tl.trans(k), input_precision="ieee" if IEEE else None) * qk_scale
    pij = tl.exp2(qk - lse[:, None])
    if MASK:
        pij = tl.where(ok, pij, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee" if IEEE else None)
    ds = pij * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision="ieee" if IEEE else None)


@triton.jit
def _query_tile(BOUNDS, S, N, HQ, GROUP, TILES, BM: tl.constexpr, BN: tl.constexpr):
    """This program's query tile (late tiles read the longest lists: they start first) and its key ranges:
    list entries [0, a_full) seen by every query, [a_full, a_hi) by some, band keys [lo, hi)."""
    t = TILES - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    a_full = (tl.load(BOUNDS + (b * 2) * TILES + t) // BN) * BN
    a_hi = tl.load(BOUNDS + (b * 2 + 1) * TILES + t)
    lo = (tl.maximum(t * BM - N + 1, 0) // BN) * BN
    hi = tl.minimum(t * BM + BM, S)
    return t, bh, b, h, h // GROUP, a_full, a_hi, lo, hi


@triton.jit
def _fwd(Q, K, V, KC, VC, POS, BOUNDS, O, LSE, qk_scale, S, G, N, HQ, GROUP, TILES,
         sqb, sqh, sqs, skb, skh, sks,
         BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    t, bh, b, h, hk, a_full, a_hi, lo, hi = _query_tile(BOUNDS, S, N, HQ, GROUP, TILES, BM, BN)
    offs_m = t * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows = offs_m < S
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=rows[:, None], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    kc = KC + (b * (HQ // GROUP) + hk) * G * D
    vc = VC + (b * (HQ // GROUP) + hk) * G * D
    for start in range(0, a_full, BN):  # kept keys older than every window of the tile
        offs_c = start + tl.arange(0, BN)
        m_i, l_i, acc = _softmax_step(q, kc, vc, offs_c, D, offs_c, offs_c, m_i, l_i, acc, qk_scale, offs_d, IEEE,
                                      MASK=False)
    for start in range(a_full, a_hi, BN):  # kept keys older than some of its windows
        offs_c = start + tl.arange(0, BN)
        live = offs_c < a_hi
        p = tl.load(POS + b * G + offs_c, mask=live, other=0)
        ok = (p[None, :] <= offs_m[:, None] - N) & live[None, :]
        m_i, l_i, acc = _softmax_step(q, kc, vc, offs_c, D, live, ok, m_i, l_i, acc, qk_scale, offs_d, IEEE,
                                      MASK=True)
    kb = K + b * skb + hk * skh
    vb = V + b * skb + hk * skh
    for start in range(lo, hi, BN):  # the window band
        offs_n = start + tl.arange(0, BN)
        ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] - offs_n[None, :] < N)
        m_i, l_i, acc = _softmax_step(q, kb, vb, offs_n, sks, offs_n < S, ok, m_i, l_i, acc, qk_scale, offs_d,
                                      IEEE, MASK=True)
    out = acc / l_i[:, None]
    tl.store(O + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=rows[:, None])
    tl.store(LSE + bh * S + offs_m, m_i + tl.log2(l_i), mask=rows)


@triton.jit
def _bwd_dq(Q, K, V, KC, VC, O, DO, LSE, DELTA, POS, BOUNDS, DQ, qk_scale, scale, S, G, N, HQ, GROUP, TILES,
            sqb, sqh, sqs, skb, skh, sks,
            BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    """dQ per query tile; also writes delta = rowsum(dO * O), which the dK/dV kernels (launched after) read."""
    t, bh, b, h, hk, a_full, a_hi, lo, hi = _query_tile(BOUNDS, S, N, HQ, GROUP, TILES, BM, BN)
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
    dq = tl.zeros([BM, D], tl.float32)
    kc = KC + (b * (HQ // GROUP) + hk) * G * D
    vc = VC + (b * (HQ // GROUP) + hk) * G * D
    for start in range(0, a_full, BN):  # rows past S have lse 0 and dO 0: their dq is never stored
        offs_c = start + tl.arange(0, BN)
        dq = _dq_step(q, do, lse, delta, kc, vc, offs_c, D, offs_c, offs_c, dq, qk_scale, offs_d, IEEE, MASK=False)
    for start in range(a_full, a_hi, BN):
        offs_c = start + tl.arange(0, BN)
        live = offs_c < a_hi
        p = tl.load(POS + b * G + offs_c, mask=live, other=0)
        ok = (p[None, :] <= offs_m[:, None] - N) & live[None, :] & rows[:, None]
        dq = _dq_step(q, do, lse, delta, kc, vc, offs_c, D, live, ok, dq, qk_scale, offs_d, IEEE, MASK=True)
    kb = K + b * skb + hk * skh
    vb = V + b * skb + hk * skh
    for start in range(lo, hi, BN):
        offs_n = start + tl.arange(0, BN)
        ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] - offs_n[None, :] < N) & rows[:, None]
        dq = _dq_step(q, do, lse, delta, kb, vb, offs_n, sks, offs_n < S, ok, dq, qk_scale, offs_d, IEEE, MASK=True)
    tl.store(DQ + qo, (dq * scale).to(DQ.dtype.element_ty), mask=rows[:, None])


@triton.jit
def _dkdv_step(k, v, dk, dv, qb, dob, lb, db, start, pos, live, S, N, sqs, qk_scale, offs_d, BM: tl.constexpr,
               LIST: tl.constexpr, IEEE: tl.constexpr, MASK: tl.constexpr):
    """One block of queries into a key tile's dK/dV. MASK False: every query sees every live key and
    exists (keys that are not live only fill rows that are never stored)."""
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
        pt = tl.where(ok & live[:, None] & rows[None, :], pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee" if IEEE else None)
    dpt = tl.dot(v, tl.trans(do), input_precision="ieee" if IEEE else None)
    dk += tl.dot((pt * (dpt - delta[None, :])).to(q.dtype), q, input_precision="ieee" if IEEE else None)
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, POS, SLOT, DKL, DVL, DK, DV, qk_scale, scale, S, G, N, HQ, GROUP, KV_HEADS,
              SPLIT, sqb, sqh, sqs, skb, skh, sks, sdb, sdh, sds,
              LIST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr):
    """One key tile for one kv head: entries of the compact copy (LIST True, launched first; the queries
    that read a tile are split over SPLIT programs, each writing an fp32 partial) or band keys of K/V
    (LIST False), which add the SPLIT partials of their kept keys (SLOT: list index or -1)."""
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
        full_lo = tl.max(tl.where(live, pos, 0), 0) + N  # from here on every query reads every entry
        full_hi = S
        q_end = S
    else:
        live = offs_n < S
        pos = offs_n
        first_q = t * BN
        full_lo = t * BN + BN - 1
        full_hi = t * BN + N
        q_end = tl.minimum(t * BN + BN - 1 + N, S)
    lo = (first_q // BM) * BM
    span = tl.cdiv(tl.cdiv(tl.maximum(q_end - lo, 0), tl.num_programs(2)), BM) * BM
    qs = lo + tl.program_id(2) * span
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
        for start in range(qs, ul, BM):
            dk, dv = _dkdv_step(k, v, dk, dv, qb, dob, lb, db, start, pos, live, S, N, sqs, qk_scale, offs_d,
                                BM, LIST, IEEE, MASK=True)
        for start in range(ul, uh, BM):
            dk, dv = _dkdv_step(k, v, dk, dv, qb, dob, lb, db, start, pos, live, S, N, sqs, qk_scale, offs_d,
                                BM, LIST, IEEE, MASK=False)
        for start in range(uh, qe, BM):
            dk, dv = _dkdv_step(k, v, dk, dv, qb, dob, lb, db, start, pos, live, S, N, sqs, qk_scale, offs_d,
                                BM, LIST, IEEE, MASK=True)
    dk = dk * scale
    if LIST:
        store_mask = (offs_n < G)[:, None]
        out = tl.program_id(2) * (tl.num_programs(1) * G * D) + bk * G * D + offs_n[:, None] * D + offs_d[None, :]
    else:
        store_mask = live[:, None]
        slot = tl.load(SLOT + b * S + offs_n, mask=live, other=-1)
        has = (slot >= 0)[:, None]
        lrow = bk * G * D + slot[:, None] * D + offs_d[None, :]
        for c in range(SPLIT):
            dk += tl.load(DKL + c * (tl.num_programs(1) * G * D) + lrow, mask=has, other=0.0)
            dv += tl.load(DVL + c * (tl.num_programs(1) * G * D) + lrow, mask=has, other=0.0)
        out = b * sdb + hk * sdh + offs_n[:, None] * sds + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=store_mask)


def _list_split(programs, s, bm, device):
    """How many programs share the queries of one list tile. Short sequences have few list tiles, each
    reading almost every query; on the H100 (B=1, 16 heads) 2-3 programs per tile beat 1 by 3-5% at 4K and
    16K, and 10 lost 16% at 4K (fp32 partials to write and sum), hence the cap of 3."""
    return max(1, min(triton.cdiv(4 * multiprocessors(device), programs), s // (8 * bm), 3))


def _compact(x, index):
    b, h, _, d = x.shape
    return torch.gather(x, 2, index[:, None, :, None].expand(b, h, index.shape[1], d)).contiguous()


def _launch(cfg: dict) -> list[int]:
    """The launch shapes as the flat int list the custom ops take (their schema has no dicts)."""
    return [cfg[k][f] for k in ("fwd", "dq", "dkdv") for f in ("BM", "BN", "num_warps", "num_stages")] + [
        cfg["dkdv"].get("split") or 0]


def _shape(launch, kernel):
    o = {"fwd": 0, "dq": 4, "dkdv": 8}[kernel]
    return dict(BM=launch[o], BN=launch[o + 1], num_warps=launch[o + 2], num_stages=launch[o + 3])


# The kernels behind two custom operators with a fake (meta) implementation and a registered backward:
# torch.compile, CUDA graphs and activation checkpointing see one opaque node each and never trace the
# Triton code. Every input the backward needs is an input of the forward, so it can be saved.
@torch.library.custom_op("megatron_sep::sep_attn_fwd", mutates_args=())
def sep_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, gpos: torch.Tensor,
                 slot: torch.Tensor, bounds_fwd: torch.Tensor, bounds_dq: torch.Tensor, window: int, scale: float,
                 launch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, s, d = q.shape
    hk, g = k.shape[1], gpos.shape[1]
    kc, vc = _compact(k, index), _compact(v, index)
    o = torch.empty_like(q)
    lse = torch.empty(b, hq, s, dtype=torch.float32, device=q.device)
    c = _shape(launch, "fwd")
    tiles = triton.cdiv(s, c["BM"])
    _fwd[(tiles, b * hq)](q, k, v, kc, vc, gpos, bounds_fwd, o, lse, scale * LOG2E, s, g, window, hq, hq // hk, tiles,
                          *q.stride()[:3], *k.stride()[:3], D=d, IEEE=q.dtype == torch.float32, **c)
    return o, lse


@sep_attn_fwd.register_fake
def _(q, k, v, index, gpos, slot, bounds_fwd, bounds_dq, window, scale, launch):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("megatron_sep::sep_attn_bwd", mutates_args=())
def sep_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, index: torch.Tensor, gpos: torch.Tensor, slot: torch.Tensor, bounds: torch.Tensor,
                 window: int, scale: float, launch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, hq, s, d = q.shape
    hk, g = k.shape[1], gpos.shape[1]
    do = do.contiguous()
    kc, vc = _compact(k, index), _compact(v, index)  # recomputed: cheaper than keeping them per layer
    ieee = q.dtype == torch.float32
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q)
    c = _shape(launch, "dq")
    tiles = triton.cdiv(s, c["BM"])
    _bwd_dq[(tiles, b * hq)](q, k, v, kc, vc, o, do, lse, delta, gpos, bounds, dq, scale * LOG2E, scale, s, g,
                             window, hq, hq // hk, tiles, *q.stride()[:3], *k.stride()[:3], D=d, IEEE=ieee, **c)
    c = _shape(launch, "dkdv")
    common = dict(D=d, IEEE=ieee, **c)
    list_tiles = triton.cdiv(g, c["BN"])
    split = launch[12] or _list_split(list_tiles * b * hk, s, c["BM"], q.device)
    dkl = torch.empty(split, b, hk, g, d, dtype=torch.float32, device=k.device)
    dvl = torch.empty_like(dkl)
    _bwd_dkdv[(list_tiles, b * hk, split)](q, kc, vc, do, lse, delta, gpos, slot, dkl, dvl, dkl, dvl,
                                           scale * LOG2E, scale, s, g, window, hq, hq // hk, hk, split,
                                           *q.stride()[:3], *kc.stride()[:3], 0, 0, 0, LIST=True, **common)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _bwd_dkdv[(triton.cdiv(s, c["BN"]), b * hk, 1)](q, k, v, do, lse, delta, gpos, slot, dkl, dvl, dk, dv,
                                                    scale * LOG2E, scale, s, g, window, hq, hq // hk, hk, split,
                                                    *q.stride()[:3], *k.stride()[:3], *dk.stride()[:3],
                                                    LIST=False, **common)
    return dq, dk, dv


@sep_attn_bwd.register_fake
def _(do, q, k, v, o, lse, index, gpos, slot, bounds, window, scale, launch):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, index, gpos, slot, _, bounds_dq, window, scale, launch = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], index, gpos, slot, bounds_dq)
    ctx.args = (window, scale, launch)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, index, gpos, slot, bounds = ctx.saved_tensors
    dq, dk, dv = sep_attn_bwd(do, q, k, v, o, lse, index, gpos, slot, bounds, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


sep_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def tile_rows(config: dict | None = None) -> tuple[int, int]:
    """The query-tile heights (forward, dQ) a plan needs bounds for."""
    cfg = _config(config)
    return cfg["fwd"]["BM"], cfg["dq"]["BM"]


def _config(config):
    return {name: {**c, **(config or {}).get(name, {})} for name, c in CONFIG.items()}


def sep_attention_triton(q, k, v, is_sep, init_tokens: int, window: int, scale=None, config: dict | None = None,
                         plan=None):
    """`plan`: the micro-batch's `SepPlan` (built here when not given, e.g. by tests and benchmarks).
    `config` overrides CONFIG per kernel, e.g. {"fwd": {"BM": 128}} (tests use small tiles)."""
    d = q.shape[-1]
    if d not in (16, 32, 64, 128):
        raise ValueError(f"the Triton SepAttention kernel supports head dims 16, 32, 64 and 128, not {d}. "
                         "Fix: use backend='flex' or 'reference'")
    scale = d ** -0.5 if scale is None else scale
    cfg = _config(config)
    fbm, qbm = cfg["fwd"]["BM"], cfg["dq"]["BM"]
    if plan is None:
        from .sep_plan import build_plan
        plan = build_plan(is_sep, init_tokens, [window], "triton", tile_rows=(fbm, qbm))
    o, _ = sep_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), plan.index, plan.gpos, plan.slot,
                        plan.bounds[(window, fbm)], plan.bounds[(window, qbm)], window, scale, _launch(cfg))
    return o
