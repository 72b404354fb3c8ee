"""KV cache for decoding with the SepLLM mask.

Keys are cached after RoPE at their absolute positions. A cached key j stays
visible to later queries only if it is an initial token, a separator, or inside
the window; once it has left the window it never comes back, so `evict=True`
drops such entries (the streaming saving of SepLLM) without changing any output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import Config


def separators_at(
    cfg: Config, tokens: torch.Tensor, sep_ids: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """[b, s] separator flags of a chunk of a stream at stream positions `pos`: fixed_interval marks positions,
    the other kinds the separator token ids (models not trained as SepLLM have none)."""
    if cfg.attention.kind == "fixed_interval":
        return ((pos + 1) % cfg.attention.fixed_interval == 0).expand(tokens.shape)
    # a broadcast compare, not torch.isin: no host sync for a CUDA graph to trip on, and few separator ids
    return (tokens[..., None] == sep_ids.to(tokens.device)).any(-1)


def visible(
    causal: torch.Tensor,
    keep: torch.Tensor,
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """SepLLM's rule over cached keys (shapes broadcast): a causal key stays visible inside the query's window,
    and outside it only if kept (an initial token or a separator). A dense layer (window None): causal."""
    return causal if window is None else causal & (keep | (qpos - kpos < window))


# not cuDNN: its attention builds an execution plan per shape, and the key length here changes every step
GROWING = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


class SepKVCache:
    """The full KV cache (model/cache.py's DecodeCache), with SepLLM's eviction of what no later query sees."""

    rotates, levels = False, True
    concepts = None  # DLCM: its ConceptState (inference/dlcm_cache.py)

    def __init__(self, cfg: Config, sep_ids: torch.Tensor, evict: bool = False):
        a, m = cfg.attention, cfg.model
        self.cfg, self.sep_ids, self.evict = cfg, sep_ids, evict
        self.init = a.init_tokens
        self.windows = a.layer_windows(m.num_layers, m.max_position_embeddings)
        self.kv = [None] * m.num_layers  # per layer: (k, v, positions [b?, T], keep [b, T])
        self.length = 0  # tokens seen
        self.new_keep = None
        self.level_counts = {}  # SUBLLM: per level, the kept tokens each row has cached ([b])
        self.hold = None  # speculative decoding: the length at mark(); eviction keeps what a query there sees

    def begin(self, tokens: torch.Tensor) -> torch.Tensor:
        """Register the next tokens; returns their position ids."""
        b, s = tokens.shape
        pos = torch.arange(self.length, self.length + s, device=tokens.device)
        self.new_sep = separators_at(self.cfg, tokens, self.sep_ids, pos)
        self.new_keep = self.new_sep | (pos < self.init)[None, :]
        self.new_pos = pos
        self.length += s
        return pos

    def attend(self, layer: int, q, k, v, rope=None):
        """q [b, hq, s, d], new k/v [b, hk, s, d] -> attention output over cache + new keys."""
        return self.attend_at(layer, q, k, v, self.new_pos, self.new_keep, self.length)

    def attend_at(self, layer: int, q, k, v, pos_new, keep_new, next_pos):
        """attend, with the new keys' mask positions [s] or [b, s], their keep flags [b, s], and the next
        query's position (scalar or [b]) for eviction."""
        b, s = q.shape[0], q.shape[2]
        pos_new = pos_new.expand(b, s)
        if self.kv[layer] is None:
            ck, cv, cpos, ckeep = k, v, pos_new, keep_new
        else:
            ok, ov, opos, okeep = self.kv[layer]
            ck, cv = torch.cat([ok, k], 2), torch.cat([ov, v], 2)
            cpos, ckeep = torch.cat([opos, pos_new], 1), torch.cat([okeep, keep_new], 1)
        n = self.windows[layer]
        qpos = pos_new[:, :, None]  # [b, s, 1]
        kpos = cpos[:, None, :]  # [b, 1, T]
        mask = visible(kpos <= qpos, ckeep[:, None, :], qpos, kpos, n)
        # always masked, also where one new token sees every key: the same SDPA kernel for one-token steps
        # and a speculative check of k + 1 tokens, so bf16 greedy decoding gives the same tokens both ways
        with sdpa_kernel(GROWING):
            out = F.scaled_dot_product_attention(
                q, ck, cv, attn_mask=mask[:, None], enable_gqa=ck.shape[1] != q.shape[1]
            )
        if self.evict and n is not None:
            # the next query sits at position `next_pos`: a key it cannot see, no later query sees either;
            # a column goes once no batch row needs it
            nxt = torch.as_tensor(
                next_pos if self.hold is None else self.hold, device=cpos.device
            ).reshape(-1, 1)
            live = (ckeep | (nxt - cpos < n)).any(0)
            ck, cv, cpos, ckeep = ck[:, :, live], cv[:, :, live], cpos[:, live], ckeep[:, live]
        self.kv[layer] = (ck, cv, cpos, ckeep)
        return out

    def mark(self) -> None:
        """Speculative decoding: the tokens fed from here on may be taken back with rollback(). Until then,
        eviction keeps every key a query at this length could see (a key no query there sees, no later one
        does either)."""
        self.hold = self.length

    def rollback(self, length: int) -> None:
        """Forget the tokens fed since mark() from position `length` on (mark's length <= length)."""
        check_rollback(self.hold, length, self.length)
        # the newest entries of every layer: eviction spares them while held
        drop = self.length - length
        for i, entry in enumerate(self.kv):
            if entry is not None and drop:
                k, v, pos, keep = entry
                n = pos.shape[1] - drop  # slices, not a mask: no device sync
                self.kv[i] = (k[:, :, :n], v[:, :, :n], pos[:, :n], keep[:, :n])
        self.length, self.hold = length, None

    def level(self, level: int, index: torch.Tensor, valid: torch.Tensor) -> "LevelCache":
        """SUBLLM: the cache as the blocks inside level `level` see it (the tokens at index [b, k] kept)."""
        return LevelCache(self, level, self.new_sep, index, valid)


def check_rollback(mark: int | None, length: int, now: int) -> None:
    if mark is None:
        raise RuntimeError(
            "rollback() without mark(): mark the cache before feeding tokens that may be taken back"
        )
    if not mark <= length <= now:
        raise ValueError(
            f"rollback to length {length}: it must lie between the marked length {mark} and the "
            f"current length {now}"
        )


PADDING = 1 << 40  # the mask position of a padded entry: no real query ever sees it


class LevelCache:
    """The blocks of a SUBLLM level attend over the kept tokens only, at mask positions that count kept
    tokens (as in training, where the level's sequence is the kept tokens in order); RoPE keeps the original
    positions. A padded entry (a batch row that kept fewer tokens this step) is stored at PADDING, where no
    real query sees it; a step in which no row keeps a token adds nothing."""

    rotates, levels, concepts = False, True, None

    def __init__(self, base: SepKVCache, level: int, outer_sep, index, valid):
        self.base = base
        counts = base.level_counts
        count = counts.get(
            level, torch.zeros(index.shape[0], dtype=torch.long, device=index.device)
        )
        rank = torch.cumsum(valid.long(), 1) - 1
        self.new_pos = torch.where(valid, count[:, None] + rank, torch.full_like(rank, PADDING))
        self.new_sep = torch.gather(outer_sep.expand(index.shape[0], -1), 1, index) & valid
        self.new_keep = self.new_sep | (self.new_pos < base.init)
        counts[level] = count + valid.long().sum(1)
        self.next_pos = counts[level]

    def attend(self, layer: int, q, k, v, rope=None):
        return self.base.attend_at(layer, q, k, v, self.new_pos, self.new_keep, self.next_pos)

    def level(self, level: int, index, valid) -> "LevelCache":
        return LevelCache(
            self.base,
            level,
            self.new_sep,
            index,
            valid & torch.gather(self.new_pos < PADDING, 1, index),
        )
