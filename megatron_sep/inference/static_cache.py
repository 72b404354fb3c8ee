"""A full KV cache in preallocated buffers: decode steps of fixed shape, which CUDA graphs can replay.

SepKVCache concatenates every layer's keys each step (and may evict), so each step allocates and its shapes
grow. Here each layer's keys and values live in buffers of `capacity` positions, written in place at the new
tokens' positions, and attention runs over the whole buffer under the SepLLM mask. Positions not written yet
lie in every query's future, so causality hides them; rolling back only moves the length, and the next step
overwrites what was taken back. The masks are built once per step for each distinct window, not per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Config

from .cache import check_rollback, separators_at, visible

ALIGN = 64  # buffer length multiple: SDPA's fused kernels want the mask's last dimension aligned


class StaticKVCache:
    """A fixed-size cache for CUDA graphs (model/cache.py's DecodeCache); one sequence of keys per layer."""

    rotates, levels, concepts = False, False, None

    def __init__(self, cfg: Config, sep_ids: torch.Tensor, capacity: int, batch: int = 1):
        if cfg.model.subsampled:
            raise ValueError(
                "the static KV cache holds one sequence of keys per layer; a SUBLLM model "
                "(model.structure) keeps per-level ones. Fix: use --cache full, without --cuda-graphs"
            )
        m, a = cfg.model, cfg.attention
        self.cfg, self.sep_ids, self.init = cfg, sep_ids, a.init_tokens
        self.windows = a.layer_windows(m.num_layers, m.max_position_embeddings)
        # dense layers never read the keep flags
        self.sparse = any(w is not None for w in self.windows)
        self.capacity = -(-capacity // ALIGN) * ALIGN
        self.slots = torch.arange(self.capacity, device=sep_ids.device)
        self.keep = torch.zeros(batch, self.capacity, dtype=torch.bool, device=sep_ids.device)
        self.k = [
            None
        ] * m.num_layers  # [b, kv heads, capacity, head dim], made at the first step (its dtype)
        self.v = [None] * m.num_layers
        self.length = 0
        self.hold = None
        self.graphs = None  # inference/graphs.GraphedSteps when decoding replays CUDA graphs
        self.rounds = {}  # draft tokens -> inference/device_rounds.DeviceRounds, on the target's cache

    def advance(self, s: int) -> torch.Tensor:
        """Take the next s positions (host bookkeeping only); returns them, a view of `slots`."""
        if self.length + s > self.capacity:
            raise ValueError(
                f"the static KV cache holds {self.capacity} positions; {s} more tokens at length "
                f"{self.length} do not fit. Fix: size it for the prompt plus every new token"
            )
        pos = self.slots[self.length : self.length + s]
        self.length += s
        return pos

    def step(self, model, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The model's logits for tokens [b, s] at positions pos [s] (a device tensor: no host bookkeeping)."""
        self.prepare(tokens, pos)
        return model(tokens, position_ids=pos, cache=self)

    def begin(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = self.advance(tokens.shape[1])
        self.prepare(tokens, pos)
        return pos

    def prepare(self, tokens: torch.Tensor, pos: torch.Tensor) -> None:
        """The step's device work before the layers (no host sync): the new tokens' keep flags, one mask per
        window ([b, 1, s, capacity], True = visible; the first layer to read it turns it into SDPA's bias)."""
        b, s = tokens.shape
        self.new_pos = pos
        if self.sparse:
            new_keep = (
                separators_at(self.cfg, tokens, self.sep_ids, pos) | (pos < self.init)[None, :]
            )
            self.keep.index_copy_(1, pos, new_keep.expand(b, s))
        qpos, kpos = pos[:, None], self.slots[None, :]
        causal = kpos <= qpos  # [s, capacity]
        self.masks = {
            w: visible(causal, self.keep[:, None, :], qpos, kpos, w).expand(b, s, self.capacity)[
                :, None
            ]
            for w in set(self.windows)
        }

    def level(self, level: int, index, valid):
        raise ValueError("the static KV cache serves no SUBLLM levels (levels = False)")

    def attend(self, layer: int, q, k, v, rope=None):
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        ck, cv = self.k[layer], self.v[layer]
        ck.index_copy_(2, self.new_pos, k)
        cv.index_copy_(2, self.new_pos, v)
        w = self.windows[layer]
        mask = self.masks[w]
        if mask.dtype == torch.bool:  # once per step and window: SDPA would do this in every layer
            mask = self.masks[w] = torch.zeros(
                mask.shape, dtype=q.dtype, device=q.device
            ).masked_fill_(~mask, float("-inf"))
        return F.scaled_dot_product_attention(
            q, ck, cv, attn_mask=mask, enable_gqa=ck.shape[1] != q.shape[1]
        )

    def mark(self) -> None:
        """Speculative decoding: the tokens fed from here on may be taken back with rollback()."""
        self.hold = self.length

    def rollback(self, length: int) -> None:
        check_rollback(self.hold, length, self.length)
        self.length, self.hold = length, None
