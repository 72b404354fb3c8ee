"""Training memory per GPU against sequence length, context parallelism (cp) and tensor parallelism (tp):
a model of what the Trainer keeps, checked against the peaks measured on one H200 (cp = 1), and the longest
sequence each layout fits on an 80 GB and a 141 GB GPU. Runs on CPU (the model is built on the meta device).

  PYTHONPATH=. python3 benchmarks/memory_model.py --out DIR   # DIR/memory_model.md, DIR/memory_model.png

What is counted (bf16 autocast, float32 weights, AdamW, per GPU, GiB):
- weights + Adam state: 12 bytes per parameter this rank holds (its 1/tp of every matrix). The peak comes at
  the start of backward, before gradients exist (the measured peaks show it); ZeRO-1 is not in the tables.
- activations saved for backward, per token and layer (h hidden, hk = kv heads x head dim, f MLP width):
  - 8h: the float32 residual stream into the two norms. Split over tp only with sequence parallelism.
  - 6h: the bf16 inputs of the qkv, gate and up matmuls. Saved gathered (whole sequence) under tp, SP or not.
  - 2(h + 2hk) + 4h + 8f: rotated q, k, v; the attention output and its reshaped copy; the SwiGLU's four
    f-wide tensors. Split over tp (heads and MLP columns).
  Context parallelism splits all of it: each rank keeps 1/cp of the tokens outside attention, and inside it
  the whole sequence for 1/cp of the heads (the same number of bytes). SepLLM and dense attention save the
  same tensors (neither keeps an s x s matrix); SepLLM's plan is a few bytes per token per micro-batch.
  With full activation checkpointing a layer keeps only its float32 input (4h), plus one layer recomputed.
- the fused loss: its float32 input gradient (4h per token) and one 256 MiB chunk of logits.
- one more layer's activations: the gradients of the layer backward is working on.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from megatron_sep.config import config_from_dict
from megatron_sep.model import build_model

GIB = 2**30
# usable memory as torch reports it, minus 10% for the CUDA context, NCCL buffers and fragmentation
GPUS = {"80 GB (H100)": 79.2 * 0.9, "141 GB (H200)": 139.8 * 0.9}
LLAMA350M = {
    "family": "llama",
    "num_layers": 24,
    "hidden_size": 1024,
    "num_heads": 16,
    "ffn_hidden_size": 2816,
    "vocab_size": 32000,
}
LLAMA1B3 = {
    "family": "llama",
    "num_layers": 24,
    "hidden_size": 2048,
    "num_heads": 16,
    "ffn_hidden_size": 5504,
    "vocab_size": 32000,
}
SHAPES = {"350M": LLAMA350M, "1.3B": LLAMA1B3}
# peaks measured on one H200 by benchmarks/train_throughput.py (Trainer, compiled, bf16): (file, row key)
MEASURED = [
    (
        "1.3B",
        4096,
        2,
        False,
        True,
        "2026-12-01_train_throughput_llama1.3b_h200.json",
        "trainer/dense:compile",
    ),
    (
        "350M",
        16384,
        1,
        False,
        False,
        "2026-12-01_train_throughput_sepllm_h200_llama350m-16k.json",
        "trainer/dense:compile",
    ),
    (
        "350M",
        65536,
        1,
        False,
        False,
        "2026-12-01_train_throughput_sepllm_h200_llama350m-64k.json",
        "trainer/dense:compile",
    ),
    (
        "350M",
        65536,
        1,
        True,
        False,
        "2026-12-01_train_throughput_sepllm_h200_llama350m-64k.json",
        "trainer/dense+ac:compile",
    ),
]


def shape_numbers(model: dict) -> dict:
    cfg = config_from_dict(
        {"model": {**model, "max_position_embeddings": 1 << 20}, "data": {"mock": True}}
    )
    with torch.device("meta"):
        gpt = build_model(cfg)
    m = cfg.model
    return {
        "params": gpt.num_params(),
        "layers": m.num_layers,
        "h": m.hidden_size,
        "hk": m.kv_heads * m.head_dim,
        "f": m.ffn_size,
        "vocab": gpt.padded_vocab_size,
    }


def per_token_layer(s: dict, tp: int, sp: bool) -> float:
    """Bytes one layer keeps per token of the rank's slice of the sequence."""
    h, hk, f = s["h"], s["hk"], s["f"]
    return 8 * h / (tp if sp else 1) + 6 * h + (2 * (h + 2 * hk) + 4 * h + 8 * f) / tp


def peak_gib(
    s: dict,
    seq: int,
    mbs: int = 1,
    tp: int = 1,
    cp: int = 1,
    recompute: bool = False,
    unfused_loss: bool = False,
) -> dict:
    sp = tp > 1
    tokens = mbs * seq / cp  # this rank's tokens outside attention
    layer = per_token_layer(s, tp, sp) * tokens
    act = (
        (4 * s["h"] / (tp if sp else 1) * tokens * s["layers"] + layer)
        if recompute
        else layer * s["layers"]
    )
    loss = 4 * s["h"] * tokens + 2**28
    # the runs before the fused loss: fp32 logits, their log-softmax and its gradient
    if unfused_loss:
        loss += 12 * s["vocab"] / tp * tokens
    states = 12 * s["params"] / tp
    return {
        "states": states / GIB,
        "activations": (act + layer) / GIB,
        "loss": loss / GIB,
        "total": (states + act + layer + loss) / GIB,
    }


def longest_seq(s: dict, budget: float, tp: int, cp: int, recompute: bool = False) -> int:
    """Largest multiple of 1024 (and of cp) whose modelled peak fits `budget` GiB; 0 if none does."""
    lo, hi = 0, 1 << 24
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        lo, hi = (
            (mid, hi)
            if peak_gib(s, mid, tp=tp, cp=cp, recompute=recompute)["total"] <= budget
            else (lo, mid)
        )
    return lo


def validation(results_dir: str) -> list[str]:
    rows = [
        "| shape | seq x micro-batch | loss path | recompute | modelled peak (GiB) | measured (GiB) | model / measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, seq, mbs, ac, fused, fname, key in MEASURED:
        data = json.load(open(os.path.join(results_dir, fname)))
        got = next(r["peak_mem_gb"] for r in data["rows"] if r.get("key") == key)
        want = peak_gib(
            shape_numbers(SHAPES[name]), seq, mbs, recompute=ac, unfused_loss=not fused
        )["total"]
        rows.append(
            f"| {name} | {seq} x {mbs} | {'fused' if fused else 'unfused'} | {'full' if ac else 'none'} | "
            f"{want:.1f} | {got:.1f} | {want / got:.2f} |"
        )
    return rows


def tables() -> tuple[list[str], dict]:
    out, curves = [], {}
    layouts = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (4, 1), (8, 1), (2, 2), (2, 4), (4, 2)]
    for name, model in SHAPES.items():
        s = shape_numbers(model)
        out += [
            f"**{name}** ({s['params'] / 1e6:.0f}M parameters, {s['layers']} layers, hidden {s['h']}, "
            f"MLP {s['f']}); longest sequence (tokens, multiple of 1024) at micro-batch 1:",
            "",
            "| tp x cp (GPUs) | "
            + " | ".join(GPUS)
            + " | with full recompute, "
            + list(GPUS)[-1]
            + " |",
            "|---|" + "---|" * (len(GPUS) + 1),
        ]
        for tp, cp in layouts:
            fits = [longest_seq(s, b, tp, cp) for b in GPUS.values()]
            ac = longest_seq(s, list(GPUS.values())[-1], tp, cp, recompute=True)
            out.append(
                f"| tp{tp} x cp{cp} ({tp * cp}) | "
                + " | ".join(f"{x // 1024}K" for x in fits)
                + f" | {ac // 1024}K |"
            )
        out.append("")
        seqs = [2**k for k in range(12, 21)]
        curves[name] = {
            f"tp{tp} cp{cp}": [peak_gib(s, q, tp=tp, cp=cp)["total"] for q in seqs]
            for tp, cp in [(1, 1), (2, 1), (1, 2), (1, 4), (1, 8), (2, 4)]
        }
        curves[name]["_seqs"] = seqs
    return out, curves


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5))
    for ax, (name, c) in zip(axes, curves.items()):
        seqs = c.pop("_seqs")
        for label, ys in c.items():
            ax.plot(seqs, ys, marker="o", ms=3, label=label)
        for gpu, budget in GPUS.items():
            ax.axhline(budget, color="grey", ls="--", lw=0.8)
            ax.text(seqs[0], budget * 1.05, gpu, fontsize=8, color="grey")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="sequence length (tokens, micro-batch 1)",
            ylabel="modelled peak memory per GPU (GiB)",
            title=f"Llama {name}: memory per GPU",
        )
        ax.set_xticks(seqs, [f"{q // 1024}K" for q in seqs])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for memory_model.md and memory_model.png")
    ap.add_argument(
        "--results",
        default=os.path.join(os.path.dirname(__file__), "results"),
        help="folder with the measured train_throughput JSON files",
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lines = (
        ["## Modelled against measured (one H200, cp = 1)", ""] + validation(args.results) + [""]
    )
    table, curves = tables()
    lines += ["## Longest sequence per layout", "", *table]
    with open(os.path.join(args.out, "memory_model.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(curves, os.path.join(args.out, "memory_model.png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
