"""Speculative decoding against the target alone: acceptance, target passes per token and tokens/s, batch 1.

  PYTHONPATH=. python3 benchmarks/speculative_decoding.py --target RUN --draft RUN --out DIR \
      [--prompts data/stream/heldout.jsonl] [--n 8] [--prompt-tokens 64] [--new 128] [--k 1,2,4,8] [--cuda-graphs]

Prompts are the first --prompt-tokens tokens of the first --n documents of the held-out stream (text the models
never trained on). Each prompt is decoded greedily by the target alone (`generate`) and with the draft
(`speculative_generate`) at each k, and once sampled (temperature 1) at k=4. Every decode is timed whole,
prompt included, after a warm-up decode at the same k (a new k's first decode meets new kernel shapes); both
models in --dtype on the GPU. --cuda-graphs decodes both ways with CUDA graphs (inference/graphs.py), the
target alone included. Writes DIR/speculative.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from megatron_sep.checkpoint import load_model
from megatron_sep.data.tokenizer import load_tokenizer
from megatron_sep.inference import DecodeOptions, generate
from megatron_sep.inference.speculative import speculative_generate


def timed(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def prompts(path: str, tok, n: int, length: int, device: str) -> list[torch.Tensor]:
    rows = []
    for line in open(path):
        ids = tok.encode(json.loads(line)["text"])
        if len(ids) >= length:
            rows.append(torch.tensor([ids[:length]], device=device))
        if len(rows) == n:
            return rows
    raise SystemExit(
        f"error: {path} has fewer than {n} documents of {length} tokens. Fix: lower --n or "
        "--prompt-tokens"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", default="data/stream/heldout.jsonl")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--k", default="1,2,4,8")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument(
        "--device", default="cuda", help="cpu: a smoke run of the script, not a measurement"
    )
    ap.add_argument(
        "--cuda-graphs", action="store_true", help="decode with CUDA graphs, the target alone too"
    )
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    target, cfg = load_model(args.target)
    draft, _ = load_model(args.draft)
    target.to(args.device, dtype), draft.to(args.device, dtype)
    tok = load_tokenizer(cfg.data.tokenizer)
    rows = prompts(args.prompts, tok, args.n, args.prompt_tokens, args.device)
    ks = [int(k) for k in args.k.split(",")]
    graphs = DecodeOptions(cuda_graphs=args.cuda_graphs)
    # warm-up: kernels, and with graphs the prompt's shape (captured at its second sighting)
    for _ in range(2):
        (
            generate(target, rows[0], 8, graphs),
            speculative_generate(target, draft, rows[0], 8, graphs),
        )

    base, results = [], {}
    for p in rows:
        out, s = timed(lambda: generate(target, p, args.new, graphs))
        base.append({"tokens": out[0, p.shape[1] :].tolist(), "seconds": s})
    base_tps = sum(len(b["tokens"]) for b in base) / sum(b["seconds"] for b in base)
    runs = [(k, True) for k in ks] + [(4, False)]
    for k, greedy in runs:
        # this k's shapes first
        opts = replace(graphs, draft_tokens=k, greedy=greedy)
        speculative_generate(target, draft, rows[0], 2 * k + 2, opts)
        rec = []
        for i, p in enumerate(rows):
            (out, st), s = timed(
                lambda: speculative_generate(target, draft, p, args.new, replace(opts, seed=i))
            )
            new = out[0, p.shape[1] :].tolist()
            same = next(
                (j for j, (a, b) in enumerate(zip(new, base[i]["tokens"])) if a != b), len(new)
            )
            rec.append(
                {
                    "seconds": s,
                    "new": len(new),
                    "proposed": st.proposed,
                    "accepted": st.accepted,
                    "target_passes": st.target_passes,
                    "draft_passes": st.draft_passes,
                    "same_prefix": same,
                    "identical": new == base[i]["tokens"],
                }
            )
        tps = sum(r["new"] for r in rec) / sum(r["seconds"] for r in rec)
        name = f"k={k} {'greedy' if greedy else 'sampled T=1'}"
        results[name] = {
            "k": k,
            "greedy": greedy,
            "tokens_per_s": tps,
            "speedup": tps / base_tps,
            "acceptance": sum(r["accepted"] for r in rec) / sum(r["proposed"] for r in rec),
            "target_passes_per_token": sum(r["target_passes"] for r in rec)
            / sum(r["new"] for r in rec),
            "identical_to_target_only": sum(r["identical"] for r in rec),
            "prompts": len(rec),
            "median_same_prefix": statistics.median(r["same_prefix"] for r in rec),
            "per_prompt": rec,
        }
        print(
            f"{name:<16} {tps:8.1f} tok/s  {tps / base_tps:5.2f}x  acceptance {results[name]['acceptance']:.1%}  "
            f"target passes/token {results[name]['target_passes_per_token']:.3f}  "
            f"identical {results[name]['identical_to_target_only']}/{len(rec)}",
            flush=True,
        )
    env = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "cuda_graphs": args.cuda_graphs,
        "target_params": target.num_params(),
        "draft_params": draft.num_params(),
        "target_layers": cfg.model.num_layers,
        "draft_layers": draft.cfg.model.num_layers,
    }
    summary = {
        "env": env,
        "args": vars(args),
        "target_only_tokens_per_s": base_tps,
        "target_only_seconds": [b["seconds"] for b in base],
        "runs": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"Target {env['target_params'] / 1e6:.0f}M ({env['target_layers']} layers), draft "
        f"{env['draft_params'] / 1e6:.0f}M ({env['draft_layers']} layers), {env['device']}, {args.dtype}, "
        f"{'CUDA graphs' if args.cuda_graphs else 'eager'}, batch 1, {len(rows)} prompts of "
        f"{args.prompt_tokens} tokens, {args.new} new tokens each.",
        "",
        f"Target alone (greedy): {base_tps:.1f} tokens/s.",
        "",
        "| run | tokens/s | vs target alone | acceptance | target passes per token | identical to target alone |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['acceptance']:.1%} | "
        f"{r['target_passes_per_token']:.3f} | {r['identical_to_target_only']}/{r['prompts']} |"
        for n, r in results.items()
    ]
    (out / "speculative.md").write_text("\n".join(lines) + "\n")
    plot(results, base_tps, out / "speculative.png")
    print("\n".join(lines))


def plot(results: dict, base_tps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    greedy = {r["k"]: r for r in results.values() if r["greedy"]}
    ks = sorted(greedy)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ks, [greedy[k]["speedup"] for k in ks], "o-", label="greedy")
    a.axhline(1.0, color="gray", ls=":", label="target alone")
    a.set_xlabel("draft tokens per round (k)")
    a.set_ylabel(f"tokens/s vs target alone ({base_tps:.0f} tok/s)")
    a.set_xscale("log", base=2)
    a.legend()
    b.plot(ks, [greedy[k]["acceptance"] for k in ks], "o-", label="acceptance rate")
    b.plot(
        ks,
        [greedy[k]["target_passes_per_token"] for k in ks],
        "s-",
        label="target passes per token",
    )
    b.set_xlabel("draft tokens per round (k)")
    b.set_xscale("log", base=2)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
