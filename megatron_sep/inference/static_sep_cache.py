"""SepCache in fixed-shape buffers, with retention decided on the device: a chunk step that CUDA graphs can
replay (inference/graphs.py GraphedChunks), for streams of millions of tokens at GPU speed.

Same semantics as SepCache (sep_cache.py), tested equal to it. What differs is the shape of the work:
- the bookkeeping (`pos`, `sep`, `valid` [b, capacity]) and each layer's keys and values
  ([b, hk, capacity + chunk, d]) live in buffers allocated once; a step writes its chunk's keys into the
  last columns, attends over all of them under a mask (invalid columns hidden), then moves the columns
  still alive to the front in stream order (one gather per tensor) and marks the rest invalid;
- a chunk of s tokens fires at most `max_compressions(s)` compressions per row, so the retention runs
  that many rounds unconditionally (a round where nothing fires changes nothing) instead of asking the
  device after each one;
- the stream position lives in a device counter, so positions need no host value either.
After a step at most capacity - 1 entries are alive, so `capacity` columns always hold them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fused_ops.rope import rotate
from .cache import separators_at, visible
from .sep_cache import SepCache, max_compressions, retention


class StaticSepCache(SepCache):
    """A fixed-shape SepCache (model/cache.py's DecodeCache). `chunk`: the tokens a step feeds at most
    without reallocating (a longer step, such as a prompt, grows the buffers once, outside any graph).
    Speculative decoding's mark/rollback is SepCache's (it keeps per-step copies); this one refuses it."""

    def __init__(self, cfg, sep_ids, *, chunk: int = 64, **sizes):
        super().__init__(cfg, sep_ids, **sizes)
        self.chunk = chunk
        self.t0 = None  # [1] long: the stream position of the next token, on the device
        self.graphs = None  # inference/graphs.GraphedChunks when steps replay a CUDA graph

    def held_bytes(self) -> int:
        """Bytes of keys and values the valid entries take (a host sync); the buffers hold more."""
        if self.pos is None or self.kv[0] is None:
            return 0
        per_entry = sum(t[0, :, 0].numel() * t.element_size() for e in self.kv for t in e)
        return int(self.valid.sum()) * per_entry

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.kv if e is not None for t in e)

    def _allocate(self, b: int, device) -> None:
        c = self.capacity
        self.pos = torch.zeros(b, c, dtype=torch.long, device=device)
        self.sep = torch.zeros(b, c, dtype=torch.bool, device=device)
        self.valid = torch.zeros(b, c, dtype=torch.bool, device=device)
        self.t0 = torch.zeros(1, dtype=torch.long, device=device)
        self.steps = torch.arange(max(self.chunk, 1), device=device)

    def begin(self, tokens: torch.Tensor) -> torch.Tensor:
        """Register the next chunk [b, s]; returns its stream positions (a device tensor, no host sync)."""
        b, s = tokens.shape
        if self.pos is None:
            self._allocate(b, tokens.device)
        if s > self.steps.numel():
            self.steps = torch.arange(s, device=tokens.device)
        qpos = self.t0 + self.steps[:s]
        new_sep = (
            torch.zeros_like(tokens, dtype=torch.bool)
            if self.streaming
            else separators_at(self.cfg, tokens, self.sep_ids, qpos)
        )
        pos = torch.cat([self.pos, qpos.expand(b, s)], 1)
        sep = torch.cat([self.sep, new_sep], 1)
        valid = torch.cat([self.valid, torch.ones_like(new_sep)], 1)
        rounds = max_compressions(s, self.sizes)
        retained, alive = retention(pos, sep, valid, qpos, self.sizes, rounds)
        # the alive columns first, in stream order; the first `capacity` hold all of them
        idx = torch.sort((~alive).to(torch.int8), dim=1, stable=True).indices[:, : self.capacity]
        self._step = dict(
            qpos=qpos,
            pos=pos,
            keep=sep | (pos < self.mask_init),
            base=retained & (pos[:, None, :] <= qpos[None, :, None]),
            idx=idx,
            slots=torch.cumsum(valid.long(), 1) - 1 if self.rotates else None,
            masks={},
        )
        self.pos.copy_(pos.gather(1, idx))
        self.sep.copy_(sep.gather(1, idx))
        self.valid.copy_(alive.gather(1, idx))
        self.t0 += s
        self.length += s
        return qpos

    def attend(self, layer: int, q, k, v, rope=None):
        st, c = self._step, self.capacity
        b, hk, s, d = k.shape
        if self.kv[layer] is None or self.kv[layer][0].shape[2] < c + s:
            self._grow(layer, k, v, c + max(s, self.chunk))
        bk, bv = self.kv[layer]
        bk[:, :, c : c + s].copy_(k)
        bv[:, :, c : c + s].copy_(v)
        ck, cv = bk[:, :, : c + s], bv[:, :, : c + s]
        w = self.windows[layer]
        bias = st["masks"].get(w)
        # once per step and window, as an additive bias (SDPA converts a bool mask each call)
        if bias is None:
            allowed = visible(
                st["base"],
                st["keep"][:, None, :],
                st["qpos"][None, :, None],
                st["pos"][:, None, :],
                w,
            )
            bias = st["masks"][w] = torch.zeros(
                allowed.shape, dtype=q.dtype, device=q.device
            ).masked_fill_(~allowed, float("-inf"))[:, None]
        if self.rotates:
            slots = st["slots"]
            rk = rotate(ck.transpose(1, 2), slots, *rope).transpose(1, 2)
            rq = rotate(q.transpose(1, 2), slots[:, -s:], *rope).transpose(1, 2)
        else:
            rk, rq = ck, q
        out = F.scaled_dot_product_attention(
            rq, rk, cv, attn_mask=bias, enable_gqa=hk != q.shape[1]
        )
        idx = st["idx"][:, None, :, None].expand(b, hk, c, d)
        bk[:, :, :c].copy_(ck.gather(2, idx))
        bv[:, :, :c].copy_(cv.gather(2, idx))
        return out

    def _grow(self, layer: int, k, v, width: int) -> None:
        """This layer's buffers, `width` columns wide, keeping what the old ones held."""
        b, hk, _, d = k.shape
        new = [k.new_zeros(b, hk, width, d), v.new_zeros(b, hk, width, d)]
        if self.kv[layer] is not None:
            for n, o in zip(new, self.kv[layer]):
                n[:, :, : self.capacity].copy_(o[:, :, : self.capacity])
        self.kv[layer] = tuple(new)

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step changes (graphs.py saves and restores them around its warm-up steps)."""
        return [self.pos, self.sep, self.valid, self.t0, *(t for e in self.kv for t in e)]

    def mark(self) -> None:
        raise ValueError(
            "the fixed-shape SepCache keeps no copies to roll back to. Fix: speculative decoding with "
            "--cache sep runs without --cuda-graphs (SepCache)"
        )

    def rollback(self, length: int) -> None:
        self.mark()
