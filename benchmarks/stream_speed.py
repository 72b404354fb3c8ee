"""Streaming decode speed of the bounded caches on one GPU, same checkpoint, same tokens, same call (issue 38):
SepCache as it ran before (eager, compacting, host syncs), the fixed-shape SepCache eager, and the
fixed-shape SepCache replaying one CUDA graph per chunk. Each streams the first --tokens tokens of a corpus
through `evaluate.streaming_perplexity` (the eval command's loop); perplexities must agree (same retention),
tokens/s is the comparison. Also the graph's GPU time per chunk from a replay loop with nothing else.

  PYTHONPATH=. python3 benchmarks/stream_speed.py --load RUN --data PREFIX --out DIR [--tokens 65536] [--force]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from megatron_sep.checkpoint import load_model
from megatron_sep.inference import evaluate as ev
from megatron_sep.inference.generate import feed, make_cache
from megatron_sep.outdir import script_out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--sizes", default="4,64,256,512")
    ap.add_argument("--positions", default="cache")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the three paths, no graphs")
    ap.add_argument(
        "--force", action="store_true", help="replace stream_speed.json in a non-empty --out"
    )
    args = ap.parse_args()
    script_out(args.out, args.force, "stream_speed.json")  # before any work
    sizes = tuple(int(x) for x in args.sizes.split(","))
    model, cfg = load_model(args.load)
    model.to(args.device)
    cuda = args.device == "cuda"
    stream = torch.from_numpy(ev.corpus_tokens(args.data, args.tokens + 1))
    rows = []
    for name, fixed, graphs in (
        ("SepCache eager (before)", False, False),
        ("fixed-shape eager", True, False),
        ("fixed-shape CUDA graphs", True, True),
    ):
        r = ev.streaming_perplexity(
            model,
            stream,
            "sep",
            sizes,
            args.positions,
            args.chunk,
            args.tokens,
            False,
            None,
            cuda_graphs=graphs,
            fixed_shape=fixed,
        )
        rows.append(
            {"path": name, **{k: r[k] for k in ("tokens", "ppl", "tokens_per_s", "seconds")}}
        )
        rows[-1]["kv_allocated_bytes"] = r["kv_allocated_bytes"]
        rows[-1]["peak_kv_bytes"] = r["peak_kv_bytes"]
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["x_vs_before"] = r["tokens_per_s"] / base
    out = {
        "device": torch.cuda.get_device_name() if cuda else args.device,
        "torch": torch.__version__,
        "checkpoint": args.load,
        "chunk": args.chunk,
        "sizes": sizes,
        "positions": args.positions,
        "rows": rows,
    }
    if cuda:
        out.update(graph_only(model, stream, sizes, args))
    print(json.dumps(out, indent=1))
    with open(f"{args.out}/stream_speed.json", "w") as f:
        json.dump(out, f, indent=1)


def graph_only(model, stream, sizes, args) -> dict:
    """The graph alone: replays of one chunk (state advancing as in a stream), no loss, no host reads."""
    kv = make_cache(model, "sep", sizes, args.positions, cuda_graphs=True, chunk=args.chunk)
    piece = stream[: args.chunk][None].cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            feed(model, kv, piece)
        torch.cuda.synchronize()
        n, t = 500, time.perf_counter()
        graph = kv.graphs.graphs[args.chunk][0]
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
    chunk_ms = (time.perf_counter() - t) / n * 1e3
    return {
        "graph_replay_ms_per_chunk": chunk_ms,
        "graph_only_tokens_per_s": args.chunk / chunk_ms * 1e3,
    }


if __name__ == "__main__":
    main()
