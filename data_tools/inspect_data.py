"""Summaries of a `.bin/.idx` corpus: documents, tokens, length histogram, top tokens, separator share."""

from __future__ import annotations

import numpy as np

from megatron_sep.data.indexed import IndexedDataset


def inspect(prefix, tokenizer=None, separator_ids=None, top=20, bins=10) -> str:
    ds = IndexedDataset(prefix)
    # a document is its doc_idx range (several sentences in a sentence-split corpus)
    sizes = ds.doc_sizes
    lines = [f"corpus      {prefix}", f"dtype       {ds.dtype}", f"documents   {ds.num_docs:,}"]
    if len(ds) != ds.num_docs:
        lines.append(
            f"sequences   {len(ds):,} (sentence-split: {len(ds) / max(ds.num_docs, 1):.1f} per document)"
        )
    lines.append(f"tokens      {int(sizes.sum()):,}")
    if len(sizes):
        lines.append(
            f"doc length  min {sizes.min()}  median {int(np.median(sizes))}  mean {sizes.mean():.1f}  "
            f"max {sizes.max()}"
        )
        edges = np.unique(
            np.geomspace(max(1, sizes.min()), sizes.max() + 1, bins + 1).astype(np.int64)
        )
        hist, edges = np.histogram(sizes, bins=edges)
        width = max(hist.max(), 1)
        lines.append("length histogram (tokens per document)")
        for c, lo, hi in zip(hist, edges[:-1], edges[1:]):
            lines.append(f"  [{lo:>7}, {hi:>7})  {c:>8}  " + "#" * int(40 * c / width))
    from .offline_corpus import source_mix

    mix = source_mix(str(prefix), sizes) if ds.num_docs == len(ds) else None
    lines += mix or []
    counts = (
        np.bincount(np.asarray(ds.tokens), minlength=1) if len(ds.tokens) else np.zeros(1, np.int64)
    )
    if tokenizer is not None and len(counts) > tokenizer.vocab_size:
        raise ValueError(
            f"{prefix} holds token id {len(counts) - 1}, outside the tokenizer's vocabulary of "
            f"{tokenizer.vocab_size}: the corpus was made with another tokenizer. Fix: pass the "
            "tokenizer it was preprocessed with, or leave --tokenizer out"
        )
    total = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind="stable")[:top]
    lines.append(f"top {top} tokens")
    for i in order:
        if counts[i] == 0:
            break
        piece = repr(tokenizer.id_to_piece(int(i))) if tokenizer is not None else ""
        lines.append(f"  {int(i):>7} {piece:<16} {counts[i] / total:7.2%}")
    if separator_ids:
        ids = [i for i in separator_ids if i < len(counts)]
        share = counts[ids].sum() / total if ids else 0.0
        lines.append(f"separator share {share:.2%} (ids {sorted(separator_ids)})")
    return "\n".join(lines)
