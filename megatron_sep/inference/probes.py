"""Beyond-window probes (`megatron-sep eval --probes`, docs/probes.md): does a model use what lies outside
its attention window?

- copy_distance: next-token loss bucketed by how far back the answer could be copied from (the last earlier
  occurrence of the same preceding bigram followed by the same token), with per-sequence sums for a paired
  bootstrap across runs evaluated on the same data;
- passkey: a 5-digit key hidden in held-out text d tokens before the question, greedy-decoded through the
  KV cache that applies the model's training attention.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import sample_batch
from .evaluate import autocast_for
from .generate import generate
from .options import DecodeOptions

EDGES = (0, 32, 64, 128, 256, 512, 1024)
DISTANCES = (16, 48, 128, 512, 1536)
KEY_TEXT = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
PREFIX = 16  # filler tokens before the key: it must not sit among the always-visible initial tokens
NEW_TOKENS = 8


def window_of(cfg) -> tuple[int | None, int | None]:
    """(window, reach) of a model: its smallest sparse window n (None when every layer is dense) and, where
    nothing but the window carries information (streamingllm, no dense layer), how far back any layer stack can
    see: sum of (n - 1) over layers (plus the initial tokens). Separators or a dense layer: reach None."""
    a, m = cfg.attention, cfg.model
    windows = a.layer_windows(m.num_layers, m.max_position_embeddings)
    sparse = [w for w in windows if w is not None]
    window = min(sparse) if sparse else None
    reach = (
        sum(w - 1 for w in windows)
        if a.kind == "streamingllm" and len(sparse) == len(windows)
        else None
    )
    return window, reach


def check_edges(edges) -> list[int]:
    edges = [int(e) for e in edges]
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(
            f"--distance-edges {','.join(map(str, edges))}: bucket edges must start at 0 and "
            "strictly increase. Fix: e.g. --distance-edges 0,32,64,128,256,512,1024"
        )
    return edges


def copy_distances(x: torch.Tensor) -> torch.Tensor:
    """x [b, s + 1] token ids -> [b, s]: for target position t (input x_t, label x_{t+1}) the distance
    d = t - (p + 1) to the last p < t with (x_{p-1}, x_p, x_{p+1}) == (x_{t-1}, x_t, x_{t+1}); -1 where none.
    Vectorized: a stable sort of trigram codes puts each occurrence right after the previous one."""
    b, n = x.shape
    out = torch.full((b, n - 1), -1, dtype=torch.long)
    if n < 3:
        return out
    # recode to the distinct ids present so three of them fit one int64 for any vocabulary
    _, code = torch.unique(x.cpu(), return_inverse=True)
    v = int(code.max()) + 1
    tri = (code[:, :-2] * v + code[:, 1:-1]) * v + code[
        :, 2:
    ]  # trigram starting at u: target t = u + 1
    order = torch.sort(tri, dim=1, stable=True).indices
    sorted_tri = torch.gather(tri, 1, order)
    prev = torch.where(
        sorted_tri[:, 1:] == sorted_tri[:, :-1], order[:, :-1], torch.full_like(order[:, 1:], -1)
    )
    prev_u = torch.full_like(tri, -1).scatter_(1, order[:, 1:], prev)
    u = torch.arange(n - 2)
    out[:, 1:] = torch.where(prev_u >= 0, u - prev_u - 1, -1)
    return out


@torch.no_grad()
def token_losses(model, tokens: torch.Tensor, labels: torch.Tensor, device) -> torch.Tensor:
    """Per-token next-token loss [b, s] (float64, CPU) with the model's training attention."""
    with autocast_for(device):
        logits = model(tokens).float()
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").double().cpu()


@torch.no_grad()
def copy_distance(
    model, ds, iters: int, micro_batch: int, device, edges=EDGES, n_boot: int = 1000
) -> dict:
    """Loss by copy distance over the batches of loss_by_position (see copy_distances); buckets
    [edges[i], edges[i+1]), the last open, then "none" (no earlier occurrence). Each bucket keeps its sums and
    counts per sequence, in data order, for bootstrap_ci / paired_gap_ci."""
    edges = check_edges(edges)
    model.eval()
    nb = len(edges) + 1
    sums, counts, dist = [], [], np.zeros(nb)
    for i in range(iters):
        tokens, labels = sample_batch(ds, i * micro_batch, micro_batch, device)
        loss = token_losses(model, tokens, labels, device).numpy()
        d = copy_distances(torch.cat([tokens, labels[:, -1:]], 1).cpu()).numpy()
        bucket = np.where(d >= 0, np.searchsorted(edges, d, side="right") - 1, nb - 1)
        cell = (np.arange(len(d))[:, None] * nb + bucket).ravel()  # (sequence, bucket)
        sums.append(np.bincount(cell, loss.ravel(), len(d) * nb).reshape(-1, nb))
        counts.append(np.bincount(cell, None, len(d) * nb).reshape(-1, nb).astype(np.int64))
        dist += np.bincount(bucket.ravel(), np.maximum(d, 0).ravel(), nb)
    sums, counts = np.concatenate(sums), np.concatenate(counts)
    total = int(counts.sum())
    window, reach = window_of(model.cfg)
    buckets = []
    for k in range(nb):
        c, s = int(counts[:, k].sum()), float(sums[:, k].sum())
        lo, hi = bootstrap_ci(sums[:, k], counts[:, k], n_boot) if c else (None, None)
        start, end = (
            (edges[k], edges[k + 1] if k + 1 < len(edges) else None) if k < nb - 1 else (None, None)
        )
        name = "none" if start is None else f"{start}+" if end is None else f"{start}-{end - 1}"
        buckets.append(
            {
                "name": name,
                "start": start,
                "end": end,
                "tokens": c,
                "share": c / max(total, 1),
                "loss": s / c if c else None,
                "ci": [lo, hi] if c else None,
                "mean_distance": float(dist[k] / c) if c and start is not None else None,
                "seq_sums": sums[:, k].tolist(),
                "seq_counts": counts[:, k].tolist(),
            }
        )
    return {
        "edges": edges,
        "window": window,
        "reach": reach,
        "sequences": len(sums),
        "tokens": total,
        "buckets": buckets,
    }


def _ratios(sums, counts, n_boot: int, seed: int, other=None):
    """Bootstrap replicates of sum(sums)/sum(counts) over resampled sequences (minus the same for `other`,
    resampled with the same indices: the paired gap)."""
    n = len(sums)
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_boot, 100):  # blocks of replicates: bounded memory for many sequences
        idx = rng.integers(0, n, (min(100, n_boot - start), n))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = sums[idx].sum(1) / counts[idx].sum(1)
            if other is not None:
                r = r - other[0][idx].sum(1) / other[1][idx].sum(1)
        out.append(r)
    r = np.concatenate(out)
    r = r[np.isfinite(r)]  # a replicate that drew no token of the bucket has no mean
    return (
        (float("nan"), float("nan"))
        if not len(r)
        else tuple(float(q) for q in np.percentile(r, [2.5, 97.5]))
    )


def bootstrap_ci(
    per_seq_sums, per_seq_counts, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of a ratio-of-sums mean (loss per token) with sequences resampled."""
    return _ratios(np.asarray(per_seq_sums, float), np.asarray(per_seq_counts, float), n_boot, seed)


def _pair(run):
    if isinstance(run, dict):  # a bucket of copy_distance
        run = run["seq_sums"], run["seq_counts"]
    return np.asarray(run[0], float), np.asarray(run[1], float)


def paired_gap_ci(a, b, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean loss(a) - mean loss(b) for two runs scored on the same sequences: each replicate
    resamples sequence indices once and uses them for both. a, b: copy_distance buckets or (sums, counts)."""
    (sa, ca), (sb, cb) = _pair(a), _pair(b)
    if len(sa) != len(sb):
        raise ValueError(
            f"paired runs need the same sequences: {len(sa)} against {len(sb)}. Fix: evaluate both "
            "on the same data with the same --iters and --micro-batch"
        )
    return _ratios(sa, ca, n_boot, seed, (sb, cb))


def passkey_prompt(
    tokenizer, filler, key: str, distance: int, prefix: int = PREFIX
) -> tuple[list[int], list[int]]:
    """(prompt ids, positions of the key's digit tokens): filler[:prefix] + key sentence + `distance` filler
    tokens + question; `filler` holds at least prefix + distance held-out tokens."""
    said = tokenizer.encode(KEY_TEXT.format(key=key))
    head = [int(t) for t in filler[:prefix]]
    digits = [
        len(head) + i for i, t in enumerate(said) if any(c.isdigit() for c in tokenizer.decode([t]))
    ]
    ids = (
        head
        + said
        + [int(t) for t in filler[prefix : prefix + distance]]
        + tokenizer.encode(QUESTION)
    )
    return ids, digits


def passkey_trials(trials: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 5])
    return [
        f"{k:05d}" for k in rng.integers(0, 100000, trials)
    ]  # leading zeros: each digit uniform, chance 0.1


def passkey_room(
    tokenizer, seq_len: int, keys, prefix: int = PREFIX, new_tokens: int = NEW_TOKENS
) -> tuple[int, int]:
    """(the longest distance that fits seq_len, the tokens a prompt and answer take besides the distance)."""
    fixed = (
        prefix
        + max(len(tokenizer.encode(KEY_TEXT.format(key=k))) for k in keys)
        + len(tokenizer.encode(QUESTION))
        + new_tokens
    )
    return seq_len - fixed, fixed


def check_passkey(
    tokenizer, seq_len: int, distances, keys, prefix: int = PREFIX, new_tokens: int = NEW_TOKENS
):
    """Every prompt plus its answer tokens within the seq_len positions the model was trained on."""
    if not distances or any(d < 0 for d in distances):
        raise ValueError(
            f"--passkey-distances {','.join(map(str, distances))}: distances are token counts >= 0"
        )
    room, fixed = passkey_room(tokenizer, seq_len, keys, prefix, new_tokens)
    for d in distances:
        if d > room:
            fix = f"distances up to {room}" if room >= 0 else "a model trained on longer sequences"
            raise ValueError(
                f"--passkey-distances {d}: the prompt ({prefix} + {d} filler and "
                f"{fixed - prefix - new_tokens} passkey tokens) and {new_tokens} answer tokens need "
                f"{d + fixed} positions, past the {seq_len} the model was trained on (data.seq_len). "
                f"Fix: {fix}"
            )


def default_distances(tokenizer, seq_len: int, keys) -> list[int]:
    """The default distances that fit the model, and the longest one that does (a short model still gets
    probed to its limit)."""
    room = passkey_room(tokenizer, seq_len, keys)[0]
    return sorted({d for d in DISTANCES if d <= room} | ({room} if room >= 0 else set())) or list(
        DISTANCES
    )


def wilson(hits: int, n: int) -> list[float]:
    """95% Wilson interval of a proportion (sound at 0 or n hits, unlike the normal one)."""
    z, p = 1.96, hits / n
    scale = 1 + z * z / n
    mid, half = (
        (p + z * z / (2 * n)) / scale,
        z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale,
    )
    return [
        0.0 if hits == 0 else mid - half,
        1.0 if hits == n else mid + half,
    ]  # exact ends, not 1 - 1e-16


@torch.no_grad()
def passkey(
    model,
    tokenizer,
    filler_tokens,
    distances=DISTANCES,
    trials: int = 20,
    cache_kind: str = "full",
    device=None,
    seed: int = 0,
    prefix: int = PREFIX,
    new_tokens: int = NEW_TOKENS,
) -> dict:
    """Passkey retrieval accuracy per distance d (filler tokens between the key sentence and the question).
    Trial k uses the same key and filler offset at every distance (paired across distances). Greedy decoding
    through `cache_kind`: "full" (SepKVCache) applies the model's own mask, exactly as in training, for every
    attention kind; the bounded caches ("sep", "streaming") add their capacity on top."""
    device = device or next(model.parameters()).device
    distances = [int(d) for d in distances]
    keys = passkey_trials(trials, seed)
    check_passkey(tokenizer, model.cfg.data.seq_len, distances, keys, prefix, new_tokens)
    filler = np.asarray(filler_tokens, dtype=np.int64).ravel()
    need = prefix + max(distances)
    if len(filler) < need:
        raise ValueError(
            f"the held-out text holds {len(filler)} tokens, fewer than the {need} filler tokens a "
            "passkey trial needs. Fix: lower --passkey-distances, or give more text (--data, --text)"
        )
    # different trials, different filler: distinct offsets while there are enough
    span = len(filler) - need + 1
    offsets = np.random.default_rng([seed, 7]).choice(span, trials, replace=span < trials)
    window, reach = window_of(model.cfg)
    model.eval()
    rows = []
    for d in distances:
        exact = first = 0
        outputs, reaches = [], []
        for key, o in zip(keys, offsets):
            ids, digits = passkey_prompt(tokenizer, filler[o : o + need], key, d, prefix)
            # the answer's query back to the nearest key digit
            reaches.append(len(ids) - 1 - digits[-1])
            prompt = torch.tensor([ids], device=device)
            with autocast_for(device):
                out = generate(
                    model, prompt, new_tokens, DecodeOptions(greedy=True, cache=cache_kind)
                )
            text = tokenizer.decode(out[0, len(ids) :].tolist())
            number = re.search(r"\d+", text)
            exact += bool(number) and number.group() == key
            first += bool(number) and number.group()[0] == key[0]
            outputs.append(text)
        rows.append(
            {
                "distance": d,
                "trials": trials,
                "accuracy": exact / trials,
                "ci": wilson(exact, trials),
                "first_digit": first / trials,
                "key_reach": float(np.mean(reaches)),
                "outputs": outputs,
            }
        )
    return {
        "cache": cache_kind,
        "trials": trials,
        "seed": seed,
        "prefix": prefix,
        "new_tokens": new_tokens,
        "chance": 1e-5,
        "first_digit_chance": 0.1,
        "window": window,
        "reach": reach,
        "keys": keys,
        "distances": rows,
    }


def summary_lines(probes: dict) -> list[str]:
    """One line per probe for the terminal."""
    lines = (
        [f"probe passkey skipped: {probes['passkey_skipped']}"]
        if "passkey_skipped" in probes
        else []
    )
    if "copy_distance" in probes:
        buckets = probes["copy_distance"]["buckets"]
        parts = [f"{b['name']} {b['loss']:.3f} ({b['tokens']})" for b in buckets if b["tokens"]]
        lines.append(
            "probe copy distance, loss (tokens) by distance to the copyable answer: "
            + ", ".join(parts)
        )
    if "passkey" in probes:
        p = probes["passkey"]
        parts = [f"{r['distance']}: {r['accuracy']:.2f}" for r in p["distances"]]
        lines.append(
            f"probe passkey, exact accuracy by distance ({p['trials']} trials each, chance 1e-5): "
            + ", ".join(parts)
            + "; first digit "
            + ", ".join(f"{r['first_digit']:.2f}" for r in p["distances"])
            + " (chance 0.1)"
        )
    return lines


class Probes:
    """Both probes with their settings checked up front (bad values fail before any evaluation): used by
    `megatron-sep eval --probes` and by the sweep report, on the same validation batches as the loss."""

    def __init__(self, cfg, tokenizer, edges=EDGES, distances=None, trials: int = 20):
        self.edges = check_edges(edges)
        self.tok, self.trials, self.seq_len = tokenizer, trials, cfg.data.seq_len
        keys = passkey_trials(trials, 0)
        self.distances = (
            list(distances)
            if distances is not None
            else default_distances(tokenizer, self.seq_len, keys)
        )
        self.passkey_fits = passkey_room(tokenizer, self.seq_len, keys)[0] >= 0
        if distances is not None or self.passkey_fits:
            check_passkey(tokenizer, self.seq_len, self.distances, keys)

    def run(self, model, ds, iters: int, micro_batch: int, device, filler=None) -> dict:
        """copy_distance on the batches, and passkey with `filler` (default: the validation samples end to end,
        each contiguous) where a key, a question and an answer fit the sequence."""
        out = {"copy_distance": copy_distance(model, ds, iters, micro_batch, device, self.edges)}
        if not self.passkey_fits:
            out["passkey_skipped"] = (
                f"a key, a question and {NEW_TOKENS} answer tokens do not fit the "
                f"{self.seq_len} positions the model was trained on"
            )
            return out
        if filler is None:
            need = (max(self.distances) + PREFIX) * self.trials
            filler = np.concatenate(
                [np.asarray(ds[i][:-1]) for i in range(min(len(ds), need // self.seq_len + 2))]
            )
        # the full cache applies the model's training mask exactly, whatever its attention kind
        out["passkey"] = passkey(
            model, self.tok, filler, self.distances, self.trials, "full", device
        )
        return out
