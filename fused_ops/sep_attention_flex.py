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
    # power-of-two buckets keep shapes (and compiled kernels) stable across microbatches; padded
    # slots are masked out for every query, so their blocks are skipped, not computed
    g = max(_BLOCK, 1 << (count - 1).bit_length())
    if g > s:
        order = torch.cat([order, order.new_zeros(b, g - s)], dim=1)
    index = order[:, :g]
    valid = torch.arange(g, device=keep.device)[None, :] < keep.sum(1, keepdim=True)
    # invalid slots get a position no query can reach
    return torch.where(valid, index, 0), torch.where(valid, index, 2 * s + 2 * g)


def make_mask_mod(gpos, window, segment_ids, s):
    g, seg = gpos.shape[1], segment_ids

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
    return mask_mod


def gather_kv(k, v, index):
    b, hk, _, d = k.shape
    idx = index[:, None, :, None].expand(b, hk, index.shape[1], d)
    return torch.cat([torch.gather(k, 2, idx), k], dim=2), torch.cat([torch.gather(v, 2, idx), v], dim=2)


def two_part(k, v, is_sep, init_tokens, window, segment_ids):
    """Keys/values laid out as [gathered kept ; all] and the mask_mod that selects from them."""
    from .sep_attention import kept_keys

    index, gpos = gather_plan(kept_keys(is_sep, init_tokens, segment_ids))
    return (*gather_kv(k, v, index), make_mask_mod(gpos, window, segment_ids, k.shape[2]))


_PLANS: dict = {}


def _plan(is_sep, init_tokens, window, segment_ids, device):
    """Gather index and block mask, built once per microbatch and shared by the layers that use them."""
    from torch.nn.attention.flex_attention import create_block_mask

    from .sep_attention import kept_keys

    key = (id(is_sep), is_sep._version, init_tokens, window, id(segment_ids))
    if key not in _PLANS:
        if len(_PLANS) >= 8:
            _PLANS.pop(next(iter(_PLANS)))
        b, s = is_sep.shape
        index, gpos = gather_plan(kept_keys(is_sep, init_tokens, segment_ids))
        mask_mod = make_mask_mod(gpos, window, segment_ids, s)
        block_mask = create_block_mask(mask_mod, B=b, H=None, Q_LEN=s, KV_LEN=index.shape[1] + s,
                                       device=device, _compile=True)  # never materialise the full mask
        _PLANS[key] = (is_sep, index, block_mask)  # holding is_sep keeps its id unique while cached
    return _PLANS[key][1:]


def flex_sep_attention(q, k, v, is_sep, init_tokens, window, scale, segment_ids):
    index, block_mask = _plan(is_sep, init_tokens, window, segment_ids, q.device)
    k_all, v_all = gather_kv(k, v, index)
    return _compiled_flex()(q, k_all, v_all, block_mask=block_mask, scale=scale,
                            enable_gqa=k.shape[1] != q.shape[1])
