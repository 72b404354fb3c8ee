"""SepLLM attention on FlexAttention, two-part formulation (GPU).

A masked FlexAttention over [s, s] skips nothing: every 128-key block holds a
separator. Instead the keys are laid out as [G ; K]: G is the sorted list of
kept (initial / separator) keys gathered per batch row, K all keys. Query i sees
G-entries at positions p <= i - n (older than its window) and K-entries in its
band (i - n < j <= i). Both parts are block-sparse (a growing prefix of G, a
diagonal band of K), and one softmax spans both, so the result is exact and the
work per query is (#kept keys + n), not i.
"""
from __future__ import annotations

import torch

_BLOCK = 128


def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    global _FLEX
    if "_FLEX" not in globals():
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def gather_plan(keep: torch.Tensor):
    """Sorted kept positions per row, padded to a multiple of the block: (index [b, G], pos [b, G])."""
    b, s = keep.shape
    pos = torch.arange(s, device=keep.device).expand(b, s)
    order = torch.sort(torch.where(keep, pos, pos + s), dim=1).indices  # kept first, in order
    count = int(keep.sum(1).max().item())
    g = max(_BLOCK, -(-count // _BLOCK) * _BLOCK)
    if g > s:
        order = torch.cat([order, order.new_zeros(b, g - s)], dim=1)
    index = order[:, :g]
    valid = torch.arange(g, device=keep.device)[None, :] < keep.sum(1, keepdim=True)
    # invalid slots get a position no query can reach
    return torch.where(valid, index, 0), torch.where(valid, index, 2 * s + 2 * g)


def two_part(k, v, is_sep, init_tokens, window, segment_ids):
    """Keys/values laid out as [gathered kept ; all] and the mask_mod that selects from them."""
    from .sep_attention import kept_keys

    b, hk, s, d = k.shape
    index, gpos = gather_plan(kept_keys(is_sep, init_tokens, segment_ids))
    g = index.shape[1]
    idx = index[:, None, :, None].expand(b, hk, g, d)
    k_all = torch.cat([torch.gather(k, 2, idx), k], dim=2)
    v_all = torch.cat([torch.gather(v, 2, idx), v], dim=2)
    seg = segment_ids

    def mask_mod(bi, h, qi, kv):
        in_g = kv < g
        p = gpos[bi, torch.clamp(kv, max=g - 1)]
        j = kv - g
        sep_ok = p <= qi - window  # older than the window: served from the gathered list
        band_ok = (j <= qi) & (qi - j < window) & (j >= 0)
        if seg is not None:
            sq = seg[bi, qi]
            sep_ok = sep_ok & (seg[bi, torch.clamp(p, max=s - 1)] == sq)
            band_ok = band_ok & (seg[bi, torch.clamp(j, min=0)] == sq)
        return torch.where(in_g, sep_ok, band_ok)

    return k_all, v_all, mask_mod


def flex_sep_attention(q, k, v, is_sep, init_tokens, window, scale, segment_ids):
    from torch.nn.attention.flex_attention import create_block_mask

    k_all, v_all, mask_mod = two_part(k, v, is_sep, init_tokens, window, segment_ids)
    b, s = q.shape[0], q.shape[2]
    block_mask = create_block_mask(mask_mod, B=b, H=None, Q_LEN=s, KV_LEN=k_all.shape[2], device=q.device)
    return _compiled_flex()(q, k_all, v_all, block_mask=block_mask, scale=scale,
                            enable_gqa=k.shape[1] != q.shape[1])
