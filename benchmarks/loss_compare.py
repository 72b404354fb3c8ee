"""Compare the loss curves of two runs of the same data, seed and tokens per step (e.g. bf16 vs fp8, dense vs
SUBLLM).

  python3 benchmarks/loss_compare.py BASE_METRICS.jsonl OTHER_METRICS.jsonl --labels bf16,fp8 \
      --name fp8_quality --out DIR

Writes DIR/NAME.{json,md,png}: the training loss of both runs step by step, the other run's relative gap (raw,
and over a 10-step trailing mean), validation loss at each eval, tokens/s (median after warm-up), and the loss
against training time (the first step, which compiles, left out)."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SMOOTH = 10  # steps in the trailing mean: one step's loss moves with its batch; the runs see the same batches
SKIP = 10  # first steps left out of the speed median (compile and warm-up)


def read(path: str) -> dict:
    train, val = {}, {}
    for line in open(path):
        r = json.loads(line)
        if "loss" in r:
            train[r["step"]] = r
        if "val_loss" in r:
            val[r["step"]] = r["val_loss"]
    return {"train": train, "val": val}


def trailing_mean(xs: list[float], n: int) -> list[float]:
    return [statistics.fmean(xs[max(0, i - n + 1) : i + 1]) for i in range(len(xs))]


def elapsed_s(run: dict, steps: list[int]) -> list[float]:
    """Training seconds up to each step, from each step's tokens and tokens/s; step 1 (compile) counts 0."""
    prev = {s: run["train"][s].get("consumed_samples") for s in steps}
    times, seqs_before = [], 0
    for s in steps:
        r = run["train"][s]
        seqs = (prev[s] or 0) - seqs_before
        seqs_before = prev[s] or seqs_before
        times.append(
            0.0 if s == steps[0] else seqs * r.get("tokens_per_seq", 1) / r["tokens_per_s"]
        )
    return list(itertools.accumulate(times))


def speed(run: dict, steps: list[int]) -> dict:
    rows = [run["train"][s] for s in steps if s > SKIP]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "mfu": statistics.median(r.get("mfu") or 0 for r in rows),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in rows),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("other")
    ap.add_argument("--labels", default="base,other", help="names of the two runs, comma-separated")
    ap.add_argument("--name", default="loss_compare", help="stem of the output files")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--seq-len", type=int, default=0, help="tokens per sequence: adds loss against time"
    )
    ap.add_argument(
        "--after",
        type=int,
        default=30,
        help="also give the largest gap after this step (the "
        "warm-up: both runs spike there, a step apart)",
    )
    args = ap.parse_args()
    na, nb = args.labels.split(",")
    b, f = read(args.base), read(args.other)
    steps = sorted(set(b["train"]) & set(f["train"]))
    lb, lf = [b["train"][s]["loss"] for s in steps], [f["train"][s]["loss"] for s in steps]
    raw = [(y - x) / x for x, y in zip(lb, lf)]
    mb, mf = trailing_mean(lb, SMOOTH), trailing_mean(lf, SMOOTH)
    smooth = [(y - x) / x for x, y in zip(mb, mf)]
    sb, sf = speed(b, steps), speed(f, steps)
    val = {
        s: {na: b["val"][s], nb: f["val"][s], "rel": (f["val"][s] - b["val"][s]) / b["val"][s]}
        for s in sorted(set(b["val"]) & set(f["val"]))
    }
    result = {
        "labels": [na, nb],
        "steps": len(steps),
        "smooth_steps": SMOOTH,
        "max_rel_gap_smoothed": max(map(abs, smooth)),
        "max_rel_gap_raw": max(map(abs, raw)),
        "after_step": args.after,
        "max_rel_gap_smoothed_after": max(abs(g) for s, g in zip(steps, smooth) if s > args.after),
        "final_loss_smoothed": {na: mb[-1], nb: mf[-1]},
        "val": val,
        na: sb,
        nb: sf,
        "speedup": sf["tokens_per_s"] / sb["tokens_per_s"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))

    lines = [
        f"Training loss over {len(steps)} steps, {nb} against {na} (same seed and batches).",
        "",
        f"- Largest gap of the {SMOOTH}-step trailing mean: {result['max_rel_gap_smoothed']:.2%}; "
        f"largest single-step gap: {result['max_rel_gap_raw']:.2%}. After step {args.after}: "
        f"{result['max_rel_gap_smoothed_after']:.2%} (10-step mean).",
        f"- Final loss ({SMOOTH}-step mean): {na} {mb[-1]:.4f}, {nb} {mf[-1]:.4f}.",
        f"- tokens/s (median after step {SKIP}): {na} {sb['tokens_per_s']:,.0f}, {nb} "
        f"{sf['tokens_per_s']:,.0f} = {result['speedup']:.2f}x; peak memory {sb['peak_mem_gb']:.1f} vs "
        f"{sf['peak_mem_gb']:.1f} GB.",
        "",
        f"| step | val loss {na} | val loss {nb} | gap |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s} | {v[na]:.4f} | {v[nb]:.4f} | {v['rel']:+.2%} |" for s, v in val.items()]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")

    panels = 3 if args.seq_len else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.5 * panels), height_ratios=[2, 1, 2][:panels])
    ax1, ax2 = axes[0], axes[1]
    for ls, ms, name, color, s, raw_l in (
        (lb, mb, na, "tab:blue", sb, b),
        (lf, mf, nb, "tab:red", sf, f),
    ):
        ax1.plot(steps, ls, color=color, alpha=0.25, lw=0.8)
        ax1.plot(steps, ms, color=color, label=f"{name} ({s['tokens_per_s'] / 1e3:.1f}k tok/s)")
    if val:
        ax1.scatter(
            list(val),
            [v[na] for v in val.values()],
            color="tab:blue",
            marker="o",
            label=f"val {na}",
        )
        ax1.scatter(
            list(val), [v[nb] for v in val.values()], color="tab:red", marker="x", label=f"val {nb}"
        )
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.legend()
    ax1.set_title(f"{na} vs {nb} training (thin: per step; thick: {SMOOTH}-step mean)")
    ax2.plot(steps, [100 * x for x in raw], color="gray", alpha=0.4, lw=0.8, label="per step")
    ax2.plot(steps, [100 * x for x in smooth], color="black", label=f"{SMOOTH}-step mean")
    ax2.axhspan(-1, 1, color="tab:green", alpha=0.1, label="within 1%")
    ax2.axvline(args.after, color="gray", ls=":", lw=1)
    ax2.set_ylabel(f"{nb} vs {na} loss (%)")
    ax2.set_xlabel("step")
    ax2.legend()
    if args.seq_len:
        for ms, name, color, run in ((mb, na, "tab:blue", b), (mf, nb, "tab:red", f)):
            for s in steps:
                run["train"][s]["tokens_per_seq"] = args.seq_len
            axes[2].plot(elapsed_s(run, steps), ms, color=color, label=name)
        axes[2].set_yscale("log")
        axes[2].set_xlabel("training time (s; step 1, which compiles, left out)")
        axes[2].set_ylabel(f"loss ({SMOOTH}-step mean)")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
