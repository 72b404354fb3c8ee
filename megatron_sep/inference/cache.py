"""KV cache for decoding with the SepLLM mask.

Keys are cached after RoPE at their absolute positions. A cached key j stays
visible to later queries only if it is an initial token, a separator, or inside
the window; once it has left the window it never comes back, so `evict=True`
drops such entries (the streaming saving of SepLLM) without changing any output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Config


def separators_at(cfg: Config, tokens: torch.Tensor, sep_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[b, s] separator flags of a chunk of a stream at stream positions `pos`: fixed_interval marks positions,
    the other kinds the separator token ids (models not trained as SepLLM have none)."""
    if cfg.attention.kind == "fixed_interval":
        return ((pos + 1) % cfg.attention.fixed_interval == 0).expand(tokens.shape)
    return torch.isin(tokens, sep_ids.to(tokens.device))


class SepKVCache:
    def __init__(self, cfg: Config, sep_ids: torch.Tensor, evict: bool = False):
        a, m = cfg.attention, cfg.model
        self.cfg, self.sep_ids, self.evict = cfg, sep_ids, evict
        self.init = a.init_tokens
        self.windows = a.layer_windows(m.num_layers, m.max_position_embeddings)
        self.kv = [None] * m.num_layers  # per layer: (k, v, positions [b?, T], keep [b, T])
        self.length = 0  # tokens seen
        self.new_keep = None

    def begin(self, tokens: torch.Tensor) -> torch.Tensor:
        """Register the next tokens; returns their position ids."""
        b, s = tokens.shape
        pos = torch.arange(self.length, self.length + s, device=tokens.device)
        is_sep = separators_at(self.cfg, tokens, self.sep_ids, pos)
        self.new_keep = is_sep | (pos < self.init)[None, :]
        self.new_pos = pos
        self.length += s
        return pos

    def attend(self, layer: int, q, k, v):
        """q [b, hq, s, d], new k/v [b, hk, s, d] -> attention output over cache + new keys."""
        b, s = q.shape[0], q.shape[2]
        pos_new = self.new_pos
        if self.kv[layer] is None:
            ck, cv, cpos, ckeep = k, v, pos_new.expand(b, s), self.new_keep
        else:
            ok, ov, opos, okeep = self.kv[layer]
            ck, cv = torch.cat([ok, k], 2), torch.cat([ov, v], 2)
            cpos, ckeep = torch.cat([opos, pos_new.expand(b, s)], 1), torch.cat([okeep, self.new_keep], 1)
        n = self.windows[layer]
        qpos = pos_new[None, :, None]  # [1, s, 1]
        kpos = cpos[:, None, :]  # [b, 1, T]
        mask = kpos <= qpos
        if n is not None:
            mask = mask & (ckeep[:, None, :] | (qpos - kpos < n))
        out = F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask[:, None],
                                             enable_gqa=ck.shape[1] != q.shape[1])
        if self.evict and n is not None:
            # the next query sits at position `length`: a key it cannot see, no later query sees either;
            # a column goes once no batch row needs it
            live = (ckeep | (self.length - cpos < n)).any(0)
            ck, cv, cpos, ckeep = ck[:, :, live], cv[:, :, live], cpos[:, live], ckeep[:, live]
        self.kv[layer] = (ck, cv, cpos, ckeep)
        return out
