"""The sparse plan of one micro-batch for SepLLM attention: built once, outside any compiled region.

Which keys every query keeps beyond its window (initial tokens and separators) depends only on the
tokens, so it is computed once per micro-batch and handed to every layer (and pipeline stage):
- `keep` [b, s]: the always-visible keys;
- `index` / `gpos` [b, G]: the kept positions in order, padded to a power-of-two bucket G (so shapes,
  and compiled graphs, repeat across micro-batches); padding slots point at key 0 and hold a position
  no query reaches;
- `slot` [b, s]: each position's place in that list, -1 when not kept (Triton dK/dV);
- `docs` [b, 2, s] (with segments): each position's document start and end (Triton);
- `bounds[(window, BM)]` [b, 4 * tiles]: per query tile of BM rows, the first list entry in the document
  of its first / last query, and how many entries are older than all / some of its windows (Triton);
- `block_masks[window]`: FlexAttention's block mask over keys [gathered ; all] (flex).
The G bucket needs the largest kept count on the host: the one sync of a plan, once per micro-batch, unless
the caller counted it on the host (the trainer does, from the batch it reads there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BLOCK = 128  # the G bucket is a multiple of this (FlexAttention's block size)


def doc_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s]: the position where each token's document starts (segments are runs of equal ids)."""
    b, s = segment_ids.shape
    pos = torch.arange(s, device=segment_ids.device).expand(b, s)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values


def doc_bounds(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 2, s] int32: each position's document start and end (one past its last token)."""
    start = doc_starts(segment_ids)
    end = doc_starts(segment_ids.flip(1)).flip(1)  # the start seen backwards is the last token
    s = segment_ids.shape[1]
    return torch.stack([start, s - end]).transpose(0, 1).to(torch.int32).contiguous()


def kept_keys(is_sep: torch.Tensor, init_tokens: int, segment_ids: torch.Tensor | None = None):
    """Per-token bool [b, s]: an initial token (of its document, with segments) or a separator."""
    b, s = is_sep.shape
    pos = torch.arange(s, device=is_sep.device).expand(b, s)
    if segment_ids is None:
        return is_sep | (pos < init_tokens)
    return is_sep | (pos - doc_starts(segment_ids) < init_tokens)


def gather_plan(keep: torch.Tensor, max_kept: int | None = None):
    """Sorted kept positions per row, padded to a power-of-two multiple of BLOCK: (index [b, G], pos [b, G]).
    `max_kept`: the largest row's kept count when the caller knows it (counted on the host from the same
    tokens); otherwise it is read from the device, the plan's one host sync."""
    b, s = keep.shape
    pos = torch.arange(s, device=keep.device).expand(b, s)
    order = torch.sort(torch.where(keep, pos, pos + s), dim=1).indices  # kept first, in order
    counts = keep.sum(1, keepdim=True)
    count = int(counts.max().item()) if max_kept is None else max_kept
    g = max(BLOCK, 1 << (count - 1).bit_length())
    if g > s:
        order = torch.cat([order, order.new_zeros(b, g - s)], dim=1)
    index = order[:, :g]
    valid = torch.arange(g, device=keep.device)[None, :] < counts
    # invalid slots get a position no query can reach
    return torch.where(valid, index, 0).contiguous(), torch.where(
        valid, index, 2 * s + 2 * g
    ).contiguous()


@dataclass
class SepPlan:
    is_sep: torch.Tensor
    keep: torch.Tensor
    segment_ids: torch.Tensor | None = None
    index: torch.Tensor | None = None
    gpos: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    docs: torch.Tensor | None = None
    bounds: dict = field(default_factory=dict)
    block_masks: dict = field(default_factory=dict)


def tile_bounds(
    gpos: torch.Tensor, s: int, window: int, bm: int, docs: torch.Tensor | None = None
) -> torch.Tensor:
    """[b, 4 * tiles] int32, per query tile: the first list entry in the document of its first / last query
    (0 without documents), and the entries older than the window of its first / last query."""
    b = gpos.shape[0]
    first = torch.arange(-(-s // bm), device=gpos.device) * bm
    last = (first + bm - 1).clamp(max=s - 1)
    edges = torch.stack([first - window, last - window]).to(gpos.dtype).reshape(1, -1).expand(b, -1)
    older = torch.searchsorted(gpos, edges.contiguous(), right=True)
    if docs is None:
        starts = torch.zeros_like(older)
    else:
        doc_first = docs[:, 0, torch.cat([first, last])].to(gpos.dtype)
        starts = torch.searchsorted(gpos, doc_first.contiguous())
    return torch.cat([starts, older], dim=1).to(torch.int32).contiguous()


def list_slots(gpos: torch.Tensor, s: int) -> torch.Tensor:
    """[b, s] int32: the list slot of each kept position, -1 elsewhere."""
    b, g = gpos.shape
    valid = gpos < s  # padding slots go to a spare column, dropped after
    slot = torch.full((b, s + 1), -1, dtype=torch.int32, device=gpos.device)
    slot.scatter_(
        1,
        torch.where(valid, gpos, s).long(),
        torch.arange(g, dtype=torch.int32, device=gpos.device).expand(b, g).contiguous(),
    )
    return slot[:, :s].contiguous()


def build_plan(
    is_sep: torch.Tensor,
    init_tokens: int,
    windows,
    backend: str,
    segment_ids: torch.Tensor | None = None,
    tile_rows=(),
    max_kept: int | None = None,
) -> SepPlan:
    """The plan for the sparse (window < s) layers of one micro-batch. `windows`: their window sizes;
    `backend`: reference (keep only), triton (list, slots, tile bounds for each BM in `tile_rows`) or
    flex (list and block masks); `max_kept`: see gather_plan."""
    keep = kept_keys(is_sep, init_tokens, segment_ids)
    plan = SepPlan(is_sep=is_sep, keep=keep, segment_ids=segment_ids)
    if backend == "reference":
        return plan
    s = is_sep.shape[1]
    plan.index, gpos = gather_plan(keep, max_kept)
    if backend == "triton":
        plan.gpos = gpos.to(torch.int32)
        plan.slot = list_slots(plan.gpos, s)
        plan.docs = None if segment_ids is None else doc_bounds(segment_ids)
        plan.bounds = {
            (w, bm): tile_bounds(plan.gpos, s, w, bm, plan.docs)
            for w in set(windows)
            for bm in set(tile_rows)
        }
    elif backend == "flex":
        from .sep_attention_flex import block_mask

        plan.gpos = gpos
        plan.block_masks = {
            w: block_mask(gpos, w, segment_ids, s, is_sep.device) for w in set(windows)
        }
    else:
        raise ValueError(f"no SepLLM plan for backend {backend!r}; use reference, triton or flex")
    # G changes bucket between micro-batches: one compile for any G
    for t in (plan.index, plan.gpos):
        torch._dynamo.maybe_mark_dynamic(t, 1)
    return plan
