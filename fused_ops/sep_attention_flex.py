"""SepLLM attention on FlexAttention, two-part formulation (GPU).

A masked FlexAttention over [s, s] skips nothing: every 128-key block holds a
separator. Instead the keys are laid out as [G ; K]: G is the sorted list of
kept (initial / separator) keys gathered per batch row, K all keys. Query i sees
G-entries at positions p <= i - n (older than its window) and K-entries in its
band (i - n < j <= i). Both parts are block-sparse (a growing prefix of G, a
diagonal band of K), and one softmax spans both, so the result is exact and the
work per query is (#kept keys + n), not i. The gathered list and the block mask
come from the micro-batch's plan (`sep_plan.py`).
"""

from __future__ import annotations

import torch


def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    global _FLEX
    if "_FLEX" not in globals():
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


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


def block_mask(gpos, window, segment_ids, s, device):
    """FlexAttention's block mask over [gathered ; all] keys, never materialising the full mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        make_mask_mod(gpos, window, segment_ids, s),
        B=gpos.shape[0],
        H=None,
        Q_LEN=s,
        KV_LEN=gpos.shape[1] + s,
        device=device,
        _compile=True,
    )


def gather_kv(k, v, index):
    b, hk, _, d = k.shape
    idx = index[:, None, :, None].expand(b, hk, index.shape[1], d)
    return torch.cat([torch.gather(k, 2, idx), k], dim=2), torch.cat(
        [torch.gather(v, 2, idx), v], dim=2
    )


@torch.compiler.disable  # the block mask's mask_mod is a new closure per micro-batch: keep it out of graphs
def flex_sep_attention(q, k, v, index, mask, scale):
    k_all, v_all = gather_kv(k, v, index)
    return _compiled_flex()(
        q, k_all, v_all, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
