"""SepCache: the SepLLM paper's fixed-capacity KV cache, for streams of any length in bounded memory.

Each batch row's retained keys form four blocks, in stream order: the first `init` tokens; up to
`seps` separators that left the local window (the newest, when there are more); the past window
(tokens that left the local window since the last compression); the local window (the latest `window`
tokens). When a row holds `capacity` entries, its past window is compressed: separators join the
separator block (the oldest leave beyond `seps`) and the other tokens are dropped, leaving at most
init + seps + window < capacity entries. So memory is O(capacity) per layer for any stream length.

Attention runs over the retained entries under the model's own mask (an initial token of the mask's
`attention.init_tokens`, a separator, or inside the layer's training window; dense layers see every
retained entry). With nothing compressed the output is the full SepLLM computation; after compression it
is that computation over exactly the retained keys. A chunk of several tokens (prefill) gives each query
the entries retained at its own step, so any chunking gives the same result as one token at a time.

Which entries are retained depends only on positions and separator flags, so the bookkeeping (`pos`,
`sep`, `valid` [b, L]) is shared by all layers; each layer keeps its own k/v [b, hk, L, d] in the same
column order, padded per row by invalid columns.

Positions: "original" caches keys rotated at their stream positions; "cache" caches them unrotated and
rotates keys and queries by their slot among the valid entries at each step (StreamingLLM's shift, exact
for one-token steps), so rotary positions never exceed the capacity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fused_ops.rope import rotate
from ..config import Config
from .cache import check_rollback, separators_at, visible


class SepCache:
    """The bounded SepCache (model/cache.py's DecodeCache); it serves no SUBLLM levels."""

    levels, concepts = False, None

    def __init__(
        self,
        cfg: Config,
        sep_ids: torch.Tensor,
        *,
        init: int = 4,
        seps: int = 64,
        window: int = 256,
        capacity: int = 512,
        positions: str = "original",
        streaming: bool = False,
    ):
        """`streaming`: ignore separators (a StreamingLLM cache: initial tokens + window)."""
        for name, value in (("init", init), ("seps", seps), ("window", window)):
            if value < 0:
                raise ValueError(f"SepCache {name}={value} must be >= 0")
        if window < 1:
            raise ValueError("SepCache window must be >= 1: the latest token is always kept")
        if init + seps + window >= capacity:
            raise ValueError(
                f"SepCache capacity={capacity} must exceed init + seps + window = "
                f"{init + seps + window}. Fix: raise the capacity or shrink the blocks "
                "(the paper: init 4, seps 64, window 256, capacity 512)"
            )
        if positions not in ("original", "cache"):
            raise ValueError(f"SepCache positions={positions!r}: use 'original' or 'cache'")
        a, m = cfg.attention, cfg.model
        if (
            not streaming
            and a.kind != "fixed_interval"
            and (sep_ids is None or sep_ids.numel() == 0)
        ):
            raise ValueError(
                "SepCache needs separator token ids, and this model has none (it was not trained "
                "with attention.kind=sepllm). Fix: use a StreamingLLM cache (--cache streaming; streaming=True "
                "in Python) or the full cache (--cache full), or pass sep_ids resolved from the "
                "tokenizer (megatron_sep.data.separators)"
            )
        self.cfg, self.sep_ids, self.streaming = cfg, sep_ids, streaming
        self.init, self.seps, self.window, self.capacity = init, seps, window, capacity
        self.sizes = (init, seps, window, capacity)
        self.rotates = positions == "cache"
        self.mask_init = a.init_tokens
        self.windows = a.layer_windows(m.num_layers, m.max_position_embeddings)
        self.kv = [None] * m.num_layers
        self.pos = self.sep = self.valid = None  # [b, L] shared column bookkeeping
        self.length = 0
        self._step = None
        self._mark = (
            None  # speculative decoding: the state at mark(), and each step fed since (tokens, k/v)
        )

    def level(self, level: int, index, valid):
        raise ValueError("SepCache serves no SUBLLM levels (levels = False)")

    def entries(self) -> torch.Tensor:
        """Retained entries per row [b] (after the last completed step)."""
        return self.valid.sum(1) if self.valid is not None else torch.zeros(0, dtype=torch.long)

    def begin(self, tokens: torch.Tensor) -> torch.Tensor:
        """Register the next chunk of tokens [b, s]; returns their stream positions (RoPE position ids)."""
        self._commit()
        b, s = tokens.shape
        dev = tokens.device
        qpos = torch.arange(self.length, self.length + s, device=dev)
        new_sep = (
            torch.zeros_like(tokens, dtype=torch.bool)
            if self.streaming
            else separators_at(self.cfg, tokens, self.sep_ids, qpos)
        )
        if self.pos is None:
            self.pos = torch.empty(b, 0, dtype=torch.long, device=dev)
            self.sep = self.valid = torch.empty(b, 0, dtype=torch.bool, device=dev)
        pos = torch.cat([self.pos, qpos.expand(b, s)], 1)
        sep = torch.cat([self.sep, new_sep], 1)
        valid = torch.cat([self.valid, torch.ones(b, s, dtype=torch.bool, device=dev)], 1)
        retained, alive = retention(pos, sep, valid, qpos, self.sizes)
        keep_mask = sep | (pos < self.mask_init)  # the model's always-visible keys
        base = retained & (pos[:, None, :] <= qpos[None, :, None])
        order = torch.sort((~alive).to(torch.int8), dim=1, stable=True).indices
        idx = order[:, : int(alive.sum(1).max())]
        slots = None
        if self.rotates:  # slot of each column among the valid ones at the chunk's start
            slots = torch.cumsum(valid.long(), 1) - 1
        if self._mark is not None:
            self._mark["steps"].append((tokens, {}))
        self._step = dict(
            qpos=qpos,
            pos=pos,
            keep=keep_mask,
            base=base,
            idx=idx,
            slots=slots,
            next=(pos.gather(1, idx), sep.gather(1, idx), alive.gather(1, idx)),
        )
        self.length += s
        return qpos

    def attend(self, layer: int, q, k, v, rope=None):
        """q [b, hq, s, d], new k/v [b, hk, s, d] -> output over the retained entries and the chunk.
        `rope` (rotary_dim, base) when positions='cache': q and k arrive unrotated."""
        st = self._step
        old = self.kv[layer]
        ck = k if old is None else torch.cat([old[0], k], 2)
        cv = v if old is None else torch.cat([old[1], v], 2)
        mask = visible(
            st["base"],
            st["keep"][:, None, :],
            st["qpos"][None, :, None],
            st["pos"][:, None, :],
            self.windows[layer],
        )
        if self.rotates:
            slots = st["slots"]
            rk = rotate(ck.transpose(1, 2), slots, *rope).transpose(1, 2)
            rq = rotate(q.transpose(1, 2), slots[:, -q.shape[2] :], *rope).transpose(1, 2)
        else:
            rk, rq = ck, q
        out = F.scaled_dot_product_attention(
            rq, rk, cv, attn_mask=mask[:, None], enable_gqa=ck.shape[1] != q.shape[1]
        )
        if self._mark is not None:
            self._mark["steps"][-1][1][layer] = (k, v)
        self._store(layer, ck, cv)
        return out

    def _store(self, layer: int, ck, cv):
        idx = self._step["idx"][:, None, :, None].expand(ck.shape[0], ck.shape[1], -1, ck.shape[3])
        self.kv[layer] = (ck.gather(2, idx), cv.gather(2, idx))

    def mark(self) -> None:
        """Speculative decoding: the tokens fed from here on may be taken back with rollback()."""
        self._commit()
        self._mark = dict(
            state=(self.pos, self.sep, self.valid, list(self.kv), self.length), steps=[]
        )

    def rollback(self, length: int) -> None:
        """Forget the tokens fed since mark() from position `length` on. A compression may have dropped
        entries since the mark, so the cache returns to its marked state and replays the kept tokens' keys
        and values (saved as they were fed) through the same retention as one chunk: no model call."""
        m = self._mark
        check_rollback(None if m is None else m["state"][-1], length, self.length)
        self._commit()
        self.pos, self.sep, self.valid, self.kv, self.length = m["state"]
        self._mark = None
        n = length - self.length
        if n == 0:
            return
        tokens = torch.cat([t for t, _ in m["steps"]], 1)[:, :n]
        self.begin(tokens)
        for layer in range(len(self.kv)):
            k, v = (torch.cat([kv[layer][j] for _, kv in m["steps"]], 2)[:, :, :n] for j in (0, 1))
            old = self.kv[layer]
            self._store(
                layer,
                k if old is None else torch.cat([old[0], k], 2),
                v if old is None else torch.cat([old[1], v], 2),
            )

    def _commit(self):
        if self._step is not None:
            self.pos, self.sep, self.valid = self._step["next"]
            self._step = None


def retention(pos, sep, valid, qpos, sizes, rounds: int | None = None):
    """Per query of a chunk, the columns retained at its step ([b, s, T]), and those alive after the chunk
    ([b, T]), for columns at stream positions `pos`, separator flags `sep` and `valid` [b, T] (valid columns
    in stream order; the chunk's own last) and the chunk's positions `qpos` [s]. Compressions fire in each
    row when its count reaches the capacity. `rounds`: how many compressions to allow for (each a no-op in
    rows where none fires), with no host sync; None loops until none fires (one sync per round)."""
    init_n, seps, window, capacity = sizes
    b, t = pos.shape
    s = qpos.numel()
    alive = valid.clone()
    retained = alive[:, None, :].expand(b, s, t).clone()
    count = valid.sum(1) - s  # entries before the chunk
    fire = qpos[0] + (capacity - count) - 1  # the step whose insertion reaches the capacity
    done = 0
    while rounds is None or done < rounds:
        now = fire <= qpos[-1]
        if rounds is None and not bool(now.any()):
            break
        done += 1
        tau = torch.where(now, fire, torch.full_like(fire, -1))[:, None]  # [b, 1]
        seen = alive & (pos <= tau)
        init = pos < init_n
        local = pos > tau - window
        cand = seen & sep & ~init & ~local  # separators outside the initial and local blocks
        newer = cand.flip(1).cumsum(1).flip(1) - cand.long()  # candidates after this one
        keep = seen & (init | local | (cand & (newer < seps)))
        drop = seen & ~keep & now[:, None]
        alive &= ~drop
        # [b, s, 1]: queries after the compression
        later = qpos[None, :, None] > tau[:, :, None]
        retained &= ~(drop[:, None, :] & later)
        # each later step adds one entry: the next compression fires when the count is back at capacity
        fire = torch.where(now, tau[:, 0] + (capacity - keep.sum(1)), fire)
    return retained, alive


def max_compressions(s: int, sizes) -> int:
    """The most compressions a chunk of s tokens can fire in one row: after one, a row holds at most
    init + seps + window entries, and the next fires when the count is back at the capacity."""
    init, seps, window, capacity = sizes
    return -(-s // (capacity - init - seps - window))
