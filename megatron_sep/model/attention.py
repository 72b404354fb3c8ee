"""The attention core: one pluggable function per layer, plus the per-microbatch SepLLM inputs.

`build_core_attention(cfg, layer)` returns `core(q, k, v, batch, dropout)` with
q [b, hq, s, d], k/v [b, hk, s, d] -> [b, hq, s, d]. `batch` is the micro-batch's
`AttentionBatch` (`prepare_batch`): `is_sep`, `segment_ids` and the sparse plan, computed
once outside compiled code and shared by every layer and pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fused_ops
from ..config import Config

DENSE = 1 << 30  # a window no sequence reaches: dense causal (within documents when reset)


@dataclass
class AttentionBatch:
    is_sep: torch.Tensor | None = None  # [b, s] bool
    segment_ids: torch.Tensor | None = None  # [b, s] (attention.reset_per_document)
    plan: fused_ops.SepPlan | None = None  # kept keys, gathered list, tile bounds / block masks


def prepare_batch(
    cfg: Config, tokens: torch.Tensor, sep_ids: torch.Tensor, max_kept: int | None = None
) -> AttentionBatch:
    """Everything attention needs from this micro-batch's tokens, for every layer at once. `max_kept`: the
    largest row's kept-key count when the caller counted it on the host (`kept_count`): the plan then asks
    the device nothing."""
    inputs = sep_inputs(cfg, tokens, sep_ids)
    if not inputs:
        return AttentionBatch()
    return planned_batch(cfg, inputs["is_sep"], inputs.get("segment_ids"), max_kept)


def kept_count(cfg: Config, tokens: torch.Tensor, sep_ids: torch.Tensor) -> int | None:
    """The largest row's count of always-visible keys (initial tokens and separators) in a micro-batch of
    host tokens: the size of its plan's key list, known before the batch reaches the device. None for dense
    attention."""
    inputs = sep_inputs(cfg, tokens, sep_ids)
    if not inputs:
        return None
    keep = fused_ops.kept_keys(
        inputs["is_sep"], cfg.attention.init_tokens, inputs.get("segment_ids")
    )
    return int(keep.sum(1).max())


def planned_batch(
    cfg: Config,
    is_sep: torch.Tensor,
    segment_ids: torch.Tensor | None,
    max_kept: int | None = None,
) -> AttentionBatch:
    a, s = cfg.attention, is_sep.shape[1]
    windows = [
        w or DENSE
        for w in a.layer_windows(cfg.model.num_layers, cfg.model.max_position_embeddings)
        if (w is not None and w < s) or a.reset_per_document
    ]
    plan = None
    if windows:
        plan = fused_ops.plan_for(
            is_sep, a.init_tokens, windows, a.backend, segment_ids, cfg.model.head_dim, max_kept
        )
    return AttentionBatch(is_sep=is_sep, segment_ids=segment_ids, plan=plan)


def subsample_batch(cfg: Config, batch: AttentionBatch, index: torch.Tensor) -> AttentionBatch:
    """The batch of the tokens at index [b, k] (SUBLLM's inner levels): their is_sep and documents; the
    window and initial tokens count in the shorter sequence."""
    if batch.is_sep is None:
        return AttentionBatch()
    seg = None if batch.segment_ids is None else torch.gather(batch.segment_ids, 1, index)
    return planned_batch(cfg, torch.gather(batch.is_sep, 1, index), seg)


def dense_causal(q, k, v, batch, dropout=0.0):
    return F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=k.shape[1] != q.shape[1]
    )


def build_core_attention(cfg: Config, layer: int):
    a = cfg.attention
    window = a.layer_windows(cfg.model.num_layers, cfg.model.max_position_embeddings)[layer]
    if a.kind == "dense" or (window is None and not a.reset_per_document):
        return dense_causal

    def core(q, k, v, batch, dropout=0.0):
        if dropout:
            raise ValueError(
                "attention.kind other than dense does not support model.attention_dropout"
            )
        return fused_ops.sep_attention(
            q,
            k,
            v,
            batch.is_sep,
            init_tokens=a.init_tokens,
            window=window or DENSE,
            backend=a.backend,
            segment_ids=batch.segment_ids,
            plan=batch.plan,
            deterministic=a.deterministic,
        )

    return core


def separator_ids_of(cfg: Config) -> list[int]:
    a = cfg.attention
    if not cfg.wants_separators:  # SepLLM attention, or DLCM's separator boundaries
        return []
    bad = [x for x in a.separators if not isinstance(x, int)]
    if bad:
        raise ValueError(
            f"attention.separators holds unresolved strings {bad}; resolve them with the "
            "tokenizer first (megatron_sep.data.separators.resolve_separator_ids)"
        )
    return list(a.separators)


def sep_inputs(cfg: Config, tokens: torch.Tensor, sep_ids: torch.Tensor) -> dict:
    """is_sep (and segment_ids with reset_per_document) for one microbatch of token ids."""
    a = cfg.attention
    if a.kind == "dense":
        return {}
    b, s = tokens.shape
    if a.kind == "sepllm":
        is_sep = torch.isin(tokens, sep_ids)
    elif a.kind == "fixed_interval":  # positions k-1, 2k-1, ... act as separators
        pos = torch.arange(s, device=tokens.device)
        is_sep = ((pos + 1) % a.fixed_interval == 0).expand(b, s)
    else:
        is_sep = torch.zeros(b, s, dtype=torch.bool, device=tokens.device)
    out = {"is_sep": is_sep}
    if a.reset_per_document:
        if a.eod_id is None:
            raise ValueError(
                "attention.reset_per_document needs attention.eod_id (set from the tokenizer)"
            )
        ends = (tokens == a.eod_id).long()
        out["segment_ids"] = torch.cumsum(ends, dim=1) - ends  # an EOD closes its own document
    return out


def attention_stats(cfg: Config, is_sep: torch.Tensor) -> dict:
    """Share of causal (query, key) pairs kept, and the share of keys the last query still needs
    (the kept-KV ratio), averaged over layers and rows. Ignores document resets."""
    a = cfg.attention
    b, s = is_sep.shape
    keep = fused_ops.kept_keys(is_sep, a.init_tokens).long()
    prefix = torch.cumsum(keep, dim=1).double()  # kept keys in [0, t]
    i = torch.arange(s, device=is_sep.device)
    causal = s * (s + 1) / 2
    pair_share, kv_share = [], []
    for w in a.layer_windows(cfg.model.num_layers, s):
        if w is None:
            pair_share.append(1.0)
            kv_share.append(1.0)
            continue
        older = torch.where(i >= w, prefix[:, (i - w).clamp(min=0)], torch.zeros_like(prefix))
        per_query = torch.minimum(i + 1, torch.tensor(w)).double() + older
        pair_share.append((per_query.sum(1) / causal).mean().item())
        kv_share.append((per_query[:, -1] / s).mean().item())
    return {
        "kept_pairs": sum(pair_share) / len(pair_share),
        "kept_kv": sum(kv_share) / len(kv_share),
        "sep_share": is_sep.float().mean().item(),
    }
