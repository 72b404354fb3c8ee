"""Packed GPT samples from indexed datasets: splits, shuffling, blending, exact resume.

A `PackedDataset` concatenates its documents (EOD already appended by
`preprocess`; a document is a `doc_idx` range, so the sentences of a sentence-split
Megatron corpus stay together and in order) in a seeded order per epoch into one
token stream and cuts it into
`seq_len + 1`-token samples; sample order is shuffled with the same seed. Every
sample is addressed by index, so resuming from a consumed-sample count replays
exactly the same batches.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .indexed import IndexedDataError, IndexedDataset


def split_ranges(num_docs: int, split: list[float]) -> list[tuple[int, int]]:
    """Contiguous document ranges [start, end) for train / valid / test."""
    fractions = np.asarray(split, dtype=np.float64) / float(sum(split))
    bounds = np.concatenate([[0], np.round(np.cumsum(fractions) * num_docs)]).astype(np.int64)
    bounds[-1] = num_docs
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(3)]


class PackedDataset:
    def __init__(self, indexed: IndexedDataset, doc_range: tuple[int, int], seq_len: int,
                 num_samples: int | None, seed: int, name: str = ""):
        start, end = doc_range
        self.indexed, self.seq_len, self.name = indexed, seq_len, name
        docs = np.arange(start, end, dtype=np.int64)
        sizes = indexed.doc_sizes[start:end]
        tokens_per_epoch = int(sizes.sum())
        if tokens_per_epoch <= seq_len:
            raise IndexedDataError(
                f"{name or indexed.bin_path}: documents [{start}, {end}) hold {tokens_per_epoch} tokens, "
                f"fewer than one sample of {seq_len + 1}. Fix: use more data, a smaller data.seq_len, "
                "or a larger share in data.split")
        per_epoch = (tokens_per_epoch - 1) // seq_len
        wanted = per_epoch if num_samples is None else num_samples
        epochs = max(1, math.ceil((wanted * seq_len + 1) / tokens_per_epoch))
        order = np.concatenate([np.random.default_rng([seed, e]).permutation(docs) for e in range(epochs)])
        self.doc_order = order
        self.doc_end = np.cumsum(indexed.doc_sizes[order])
        available = (int(self.doc_end[-1]) - 1) // seq_len
        self.shuffle = np.random.default_rng([seed, 1 << 20]).permutation(available)[:wanted]
        self.epochs = epochs

    def __len__(self) -> int:
        return len(self.shuffle)

    def __getitem__(self, idx: int) -> np.ndarray:
        pos = int(self.shuffle[idx]) * self.seq_len
        need = self.seq_len + 1
        k = int(np.searchsorted(self.doc_end, pos, side="right"))
        parts = []
        while need > 0:
            doc = int(self.doc_order[k])
            doc_start = int(self.doc_end[k]) - int(self.indexed.doc_sizes[doc])
            piece = self.indexed.get_doc(doc, pos - doc_start, min(need, int(self.doc_end[k]) - pos))
            parts.append(piece)
            need -= len(piece)
            pos += len(piece)
            k += 1
        return np.concatenate(parts).astype(np.int64)


def blend_index(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blending: sample i comes from the dataset furthest behind its share."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    which = np.zeros(num_samples, dtype=np.int64)
    within = np.zeros(num_samples, dtype=np.int64)
    counts = np.zeros(len(w), dtype=np.int64)
    for i in range(num_samples):
        k = int(np.argmax(w * (i + 1) - counts))
        which[i], within[i] = k, counts[k]
        counts[k] += 1
    return which, within


class BlendedDataset:
    def __init__(self, datasets: list[PackedDataset], weights: list[float], num_samples: int):
        self.datasets = datasets
        self.which, self.within = blend_index(weights, num_samples)

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.datasets[int(self.which[idx])][int(self.within[idx])]


def build_datasets(paths: list[str], weights: list[float] | None, split: list[float], seq_len: int,
                   seed: int, num_samples: tuple[int, int, int]):
    """(train, valid, test) datasets over the blended corpora; None for an empty split."""
    indexed = [IndexedDataset(p) for p in paths]
    if weights is None:  # proportional to token count
        weights = [float(ix.num_tokens) for ix in indexed]
    out = []
    for s, (name, wanted) in enumerate(zip(("train", "valid", "test"), num_samples)):
        parts = []
        for i, ix in enumerate(indexed):
            lo, hi = split_ranges(ix.num_docs, split)[s]
            if hi > lo and wanted > 0:
                share = math.ceil(wanted * weights[i] / sum(weights) * 1.005) + 1
                parts.append((i, PackedDataset(ix, (lo, hi), seq_len, share, seed + 7 * i + s,
                                               f"{paths[i]} ({name})")))
        if not parts:
            out.append(None)
        elif len(parts) == 1:
            out.append(parts[0][1])
        else:
            out.append(BlendedDataset([d for _, d in parts], [weights[i] for i, _ in parts], wanted))
    return tuple(out)


def sample_batch(ds, start: int, size: int, device, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) of samples [start, start + size) of a packed dataset: the trainer's micro-batches,
    and eval's, so both read the same numbers. With vocab_size, an id outside it is an error here, on the
    host, not an index error inside the embedding."""
    return to_device(sample_rows(ds, start, size, vocab_size), device)


def sample_rows(ds, start: int, size: int, vocab_size: int | None = None, pin: bool = False) -> torch.Tensor:
    """The host half of sample_batch: the samples as one (size, seq_len + 1) tensor, pinned for an
    asynchronous copy when `pin` (the trainer's prefetch thread builds these)."""
    rows = np.stack([ds[i] for i in range(start, start + size)])
    if vocab_size is not None and rows.size and int(rows.max()) >= vocab_size:
        raise IndexedDataError(_outside(getattr(ds, "name", "") or "the corpus", int(rows.max()), vocab_size))
    data = torch.from_numpy(rows)
    return data.pin_memory() if pin else data


def to_device(rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The device half of sample_batch: (tokens, labels) of sample_rows' tensor."""
    data = rows.to(device, non_blocking=True)
    return data[:, :-1], data[:, 1:]


def _outside(where: str, top: int, vocab_size: int) -> str:
    return (f"{where} holds token id {top}, outside the model's vocabulary of {vocab_size} (model.vocab_size, "
            "set from data.tokenizer): the corpus was made with another tokenizer. Fix: set data.tokenizer to the "
            "one it was preprocessed with (`megatron-sep inspect PREFIX --tokenizer T` checks a pair)")


def check_token_range(paths: list[str], vocab_size: int, scan_bytes: int = 2 << 30) -> None:
    """Every corpus's ids fit the vocabulary. Corpora up to `scan_bytes` are scanned whole at start (about
    a second per GiB); larger ones are checked batch by batch in sample_batch."""
    for p in paths:
        ix = IndexedDataset(p)
        if np.iinfo(ix.dtype).max < vocab_size or ix.tokens.nbytes > scan_bytes or not len(ix.tokens):
            continue
        step = 1 << 26
        top = max(int(ix.tokens[i:i + step].max()) for i in range(0, len(ix.tokens), step))
        if top >= vocab_size:
            raise IndexedDataError(_outside(str(p), top, vocab_size))


def run_datasets(cfg, train_samples: int | None = None):
    """(train, valid) as a training run of this config reads them: mock tokens, or the blended corpora
    sized for train.steps global batches (or `train_samples`) and train.eval_iters validation micro-batches.
    A larger size keeps the smaller one's samples as its prefix (the shuffles are cut from one order)."""
    t, d = cfg.train, cfg.data
    wanted = (train_samples or t.steps * t.samples_per_step, t.eval_iters * t.micro_batch_size)
    if d.mock:
        return tuple(MockDataset(cfg.model.vocab_size, d.seq_len, n, d.seed + i) for i, n in enumerate(wanted))
    return build_datasets(d.paths, d.weights, d.split, d.seq_len, d.seed, (*wanted, 0))[:2]


class MockDataset:
    """Uniform random tokens, the same for a given (seed, index) (Megatron's --mock-data): for
    throughput runs with no corpus or tokenizer."""

    def __init__(self, vocab_size: int, seq_len: int, num_samples: int, seed: int):
        self.vocab_size, self.seq_len, self.num_samples, self.seed = vocab_size, seq_len, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, idx))
        return rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)
