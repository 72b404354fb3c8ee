"""Evaluating a checkpoint: validation perplexity with the training attention, loss by token position, and
streaming perplexity through a fixed-capacity cache (SepCache, StreamingLLM) or the full cache."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.dataset import sample_batch
from .generate import feed, make_cache
from .static_sep_cache import StaticSepCache


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (as the trainer), nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def validation_loss(model, ds, iters: int, micro_batch: int, device) -> float:
    """Mean over `iters` micro-batches of their mean loss: the trainer's validation number."""
    model.eval()
    total = 0.0
    with autocast_for(device):
        for i in range(iters):
            tokens, labels = sample_batch(ds, i * micro_batch, micro_batch, device)
            total += float(model(tokens, labels).double())
    return total / iters


@torch.no_grad()
def loss_by_position(model, ds, iters: int, micro_batch: int, device, buckets: int = 32) -> dict:
    """Mean next-token loss at each position, over the same batches, and in `buckets` equal ranges."""
    model.eval()
    total = None
    with autocast_for(device):
        for i in range(iters):
            tokens, labels = sample_batch(ds, i * micro_batch, micro_batch, device)
            logits = model(tokens).float()
            nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(0).double()
            total = nll if total is None else total + nll
    per_pos = (total / (iters * micro_batch)).cpu()
    edges = np.linspace(0, per_pos.numel(), min(buckets, per_pos.numel()) + 1).astype(int)
    return {
        "per_position": per_pos.tolist(),
        "buckets": [
            {"start": int(a), "end": int(b), "loss": float(per_pos[a:b].mean())}
            for a, b in zip(edges[:-1], edges[1:])
        ],
    }


@torch.no_grad()
def streaming_perplexity(
    model,
    stream: torch.Tensor,
    cache: str,
    sizes,
    positions: str,
    chunk: int,
    segment: int,
    progress: bool = True,
    time_limit: float | None = None,
    cuda_graphs: bool = True,
    fixed_shape: bool = True,
) -> dict:
    """Next-token perplexity over one long stream [n], fed `chunk` tokens at a time through the cache, per
    `segment` tokens; tokens/s; and the KV memory the cache holds. The bounded caches (sep, streaming) run
    in fixed-shape buffers (SepCache itself with `fixed_shape` False), each chunk a CUDA graph on CUDA
    (unless `cuda_graphs` is False). Losses stay on the device; the host waits for it only at sync points
    (each segment's end and every SYNC tokens), where the time, the KV bytes and the limits are read.
    The stream stops early, saying why in "stopped", past `time_limit` seconds or when the device runs out
    of memory (a full cache over a long stream): the tokens reached are the result."""
    model.eval()
    device = next(model.parameters()).device
    bounded = cache != "full"
    kv = make_cache(
        model,
        cache,
        sizes,
        positions,
        fixed_shape=bounded and fixed_shape,
        cuda_graphs=bounded and fixed_shape and cuda_graphs and device.type == "cuda",
        chunk=chunk,
    )
    graphed = getattr(kv, "graphs", None) is not None
    inputs, targets = stream[:-1].to(device), stream[1:].to(device)
    n = inputs.numel()
    nll = torch.zeros(n, dtype=torch.float64, device=device)
    kv_curve, synced = [], []
    peak, done, stopped = 0, 0, None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    begin = last = time.perf_counter()
    with (
        autocast_for(device),
        tqdm(total=n, unit="tok", disable=not progress, desc=f"stream ({cache})") as bar,
    ):
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            try:
                logits = feed(model, kv, inputs[start:end][None])[0].float()
            except torch.OutOfMemoryError:
                stopped = "out of memory"
                break
            nll[start:end] = F.cross_entropy(logits, targets[start:end], reduction="none")
            done = end
            bar.update(end - start)
            over = time_limit is not None and time.perf_counter() - begin > time_limit
            seg_end = end // segment > start // segment or end == n
            if not (seg_end or over or end // SYNC > start // SYNC):
                continue
            if device.type == "cuda":  # the time read next is the device's
                torch.cuda.synchronize(device)
            held = kv_bytes(kv)
            now = time.perf_counter()
            synced.append((end, now - last))
            last = now
            peak = max(peak, held)
            kv_curve.append((end, held))
            if time_limit is not None and now - begin > time_limit and end < n:
                stopped = "time"
                break
    seconds = last - begin
    losses = nll[:done].cpu()
    allocated = kv.allocated_bytes() if isinstance(kv, StaticSepCache) else None
    del kv, nll  # a full cache can hold most of the device's memory: free it before the next run
    seg_time = [0.0] * -(-done // segment)
    prev = 0
    for end, dt in synced:  # the time between sync points, spread over the tokens it covered
        for s in range(prev // segment, -(-end // segment)):
            share = min(end, (s + 1) * segment) - max(prev, s * segment)
            seg_time[s] += dt * share / max(end - prev, 1)
        prev = end
    segments = []
    for i in range(len(seg_time)):
        part = losses[i * segment : (i + 1) * segment]
        segments.append(
            {
                "start": i * segment,
                "tokens": part.numel(),
                "ppl": math.exp(part.mean().item()),
                "tokens_per_s": part.numel() / max(seg_time[i], 1e-9),
            }
        )
    step = max(1, len(kv_curve) // 512)  # a readable curve, not one point per chunk
    used = (
        None if cache == "full" else [sizes[0], 0 if cache == "streaming" else sizes[1], *sizes[2:]]
    )
    return {
        "cache": cache,
        "sizes": used,
        "positions": "original" if cache == "full" else positions,
        "cuda_graphs": graphed,
        "stopped": stopped,
        "tokens": done,
        "chunk": chunk,
        "segment": segment,
        "segments": segments,
        "ppl": math.exp(losses.mean().item()) if done else float("nan"),
        "tokens_per_s": done / max(seconds, 1e-9),
        "seconds": seconds,
        "peak_kv_bytes": peak,
        "kv_allocated_bytes": allocated,  # the fixed-shape cache's buffers, the same from first to last
        "kv_bytes": kv_curve[::step] + kv_curve[-1:],
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
    }


# tokens between the host's reads of the device (time, KV bytes, limits) within a segment
SYNC = 4096


@torch.no_grad()
def block_perplexity(
    model, stream: torch.Tensor, seq_len: int, segment: int, micro_batch: int, device
) -> dict:
    """The reference for streaming: perplexity per segment with the model's training attention over consecutive
    `seq_len` blocks of the stream, each from scratch (no cache). It shows how hard each segment's text is, so a
    cache's drift is its ratio to this, not to another segment."""
    model.eval()
    n = stream.numel() - 1
    nll = torch.empty(n, dtype=torch.float64)

    def run(begins, length):
        x = torch.stack([stream[b : b + length] for b in begins]).to(device)
        y = torch.stack([stream[b + 1 : b + length + 1] for b in begins]).to(device)
        loss = F.cross_entropy(model(x).float().transpose(1, 2), y, reduction="none").double().cpu()
        for b, row in zip(begins, loss):
            nll[b : b + length] = row

    whole = n // seq_len
    with autocast_for(device):
        for i in range(0, whole, micro_batch):
            run([j * seq_len for j in range(i, min(i + micro_batch, whole))], seq_len)
        if n % seq_len:
            run([whole * seq_len], n % seq_len)
    segments = [
        {
            "start": a,
            "tokens": int(min(segment, n - a)),
            "ppl": math.exp(float(nll[a : a + segment].mean())),
        }
        for a in range(0, n, segment)
    ]
    return {
        "seq_len": seq_len,
        "tokens": n,
        "segment": segment,
        "segments": segments,
        "ppl": math.exp(float(nll.mean())),
    }


def text_tokens(path: Path, tok) -> np.ndarray:
    """A .txt file (one document) or .jsonl ("text" per line) as one token stream, documents ended by EOD."""
    ids, data = [], path.read_bytes()
    try:
        # valid UTF-8, but no text holds it: a binary file (a .bin corpus, a checkpoint)
        if b"\0" in data:
            raise UnicodeDecodeError(
                "utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte"
            )
        # as open() in text mode reads
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--text {path} is a binary file, not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x})."
            ' Fix: pass a .txt file or a .jsonl of {"text": ...} lines (a .bin/.idx corpus goes '
            "to --data PREFIX)"
        ) from None
    if path.suffix != ".jsonl":
        return np.asarray(tok.encode(text) + [tok.eod_id], dtype=np.int64)
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                doc = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f'{path} line {n} is not a JSON object with a "text" field. Fix: '
                    'one {"text": ...} per line, or pass a .txt file'
                ) from None
            ids += tok.encode(doc) + [tok.eod_id]
    return np.asarray(ids, dtype=np.int64)


class Rows:
    """A token stream cut into consecutive samples of seq_len + 1 tokens (each one token past the last)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]


def corpus_tokens(prefix: str, limit: int) -> np.ndarray:
    """The first `limit` tokens of a .bin/.idx corpus, documents in order."""
    from ..data.indexed import IndexedDataset

    ix = IndexedDataset(prefix)
    parts, have = [], 0
    for d in range(ix.num_docs):
        if have >= limit:
            break
        parts.append(
            np.asarray(ix.get_doc(d, 0, min(int(ix.doc_sizes[d]), limit - have)), dtype=np.int64)
        )
        have += len(parts[-1])
    return np.concatenate(parts)[:limit] if parts else np.zeros(0, dtype=np.int64)


def kv_bytes(cache) -> int:
    """Bytes of the keys and values a cache holds now (its own tensors, not an estimate): the fixed-shape
    SepCache's valid entries; the others' tensors, (k, v, ...) per layer."""
    if isinstance(cache, StaticSepCache):
        return cache.held_bytes()
    return sum(
        t.numel() * t.element_size() for entry in cache.kv if entry is not None for t in entry[:2]
    )


# Every file write_report may write: `eval --force` replaces these and leaves anything else in --out alone.
EVAL_FILES = (
    "eval.json",
    "loss_by_position.png",
    "streaming_ppl.png",
    "kv_memory.png",
    "streaming_speed.png",
    "streaming_ppl_ratio.png",
    "loss_by_distance.png",
    "passkey.png",
)


def write_report(out: Path, result: dict) -> list[Path]:
    """eval.json and the PNG plots of what the result holds."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    from .plots import plot_loss_by_position, plot_streaming

    written = [out / "eval.json"]
    if "loss_by_position" in result:
        written.append(
            plot_loss_by_position(result["loss_by_position"], out / "loss_by_position.png")
        )
    if "streaming" in result:
        written += plot_streaming(result["streaming"], out, result.get("stream_reference"))
    if "probes" in result:
        from .plots import plot_loss_by_distance, plot_passkey

        written.append(
            plot_loss_by_distance(result["probes"]["copy_distance"], out / "loss_by_distance.png")
        )
        written.append(plot_passkey(result["probes"]["passkey"], out / "passkey.png"))
    return written
