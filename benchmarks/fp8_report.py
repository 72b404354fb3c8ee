"""Compare a bf16 and an fp8 run of the same model, seed and tokens (benchmarks/fp8_quality.sh).

  python3 benchmarks/fp8_report.py BF16_METRICS.jsonl FP8_METRICS.jsonl --out DIR

Writes DIR/fp8_quality.{json,md,png}: the training loss of both runs step by step, its relative gap (raw,
and over a 10-step trailing mean), validation loss at each eval, and tokens/s (median after warm-up)."""
from __future__ import annotations

import argparse
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
    return [statistics.fmean(xs[max(0, i - n + 1): i + 1]) for i in range(len(xs))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bf16")
    ap.add_argument("fp8")
    ap.add_argument("--out", required=True)
    ap.add_argument("--after", type=int, default=30, help="also give the largest gap after this step (the "
                    "warm-up: both runs spike there, a step apart)")
    args = ap.parse_args()
    b, f = read(args.bf16), read(args.fp8)
    steps = sorted(set(b["train"]) & set(f["train"]))
    lb, lf = [b["train"][s]["loss"] for s in steps], [f["train"][s]["loss"] for s in steps]
    raw = [(y - x) / x for x, y in zip(lb, lf)]
    mb, mf = trailing_mean(lb, SMOOTH), trailing_mean(lf, SMOOTH)
    smooth = [(y - x) / x for x, y in zip(mb, mf)]

    def speed(run):
        rows = [run["train"][s] for s in steps if s > SKIP]
        return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
                "mfu": statistics.median(r.get("mfu") or 0 for r in rows),
                "peak_mem_gb": max(r["peak_mem_gb"] for r in rows)}
    sb, sf = speed(b), speed(f)
    val = {s: {"bf16": b["val"][s], "fp8": f["val"][s], "rel": (f["val"][s] - b["val"][s]) / b["val"][s]}
           for s in sorted(set(b["val"]) & set(f["val"]))}
    result = {"steps": len(steps), "smooth_steps": SMOOTH,
              "max_rel_gap_smoothed": max(map(abs, smooth)), "max_rel_gap_raw": max(map(abs, raw)),
              "after_step": args.after,
              "max_rel_gap_smoothed_after": max(abs(g) for s, g in zip(steps, smooth) if s > args.after),
              "final_loss_smoothed": {"bf16": mb[-1], "fp8": mf[-1]}, "val": val,
              "bf16": sb, "fp8": sf, "speedup": sf["tokens_per_s"] / sb["tokens_per_s"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_quality.json").write_text(json.dumps(result, indent=1))

    lines = [f"Training loss over {len(steps)} steps, fp8 against bf16 (same seed, weights and batches).", "",
             f"- Largest gap of the {SMOOTH}-step trailing mean: {result['max_rel_gap_smoothed']:.2%}; "
             f"largest single-step gap: {result['max_rel_gap_raw']:.2%}. After step {args.after}: "
             f"{result['max_rel_gap_smoothed_after']:.2%} (10-step mean).",
             f"- Final loss ({SMOOTH}-step mean): bf16 {mb[-1]:.4f}, fp8 {mf[-1]:.4f}.",
             f"- tokens/s (median after step {SKIP}): bf16 {sb['tokens_per_s']:,.0f}, fp8 {sf['tokens_per_s']:,.0f}"
             f" = {result['speedup']:.2f}x; peak memory {sb['peak_mem_gb']:.1f} vs {sf['peak_mem_gb']:.1f} GB.", "",
             "| step | val loss bf16 | val loss fp8 | gap |", "|---|---|---|---|"]
    lines += [f"| {s} | {v['bf16']:.4f} | {v['fp8']:.4f} | {v['rel']:+.2%} |" for s, v in val.items()]
    (out / "fp8_quality.md").write_text("\n".join(lines) + "\n")

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[2, 1])
    ax1.plot(steps, lb, color="tab:blue", alpha=0.25, lw=0.8)
    ax1.plot(steps, lf, color="tab:red", alpha=0.25, lw=0.8)
    ax1.plot(steps, mb, color="tab:blue", label=f"bf16 ({sb['tokens_per_s'] / 1e3:.1f}k tok/s)")
    ax1.plot(steps, mf, color="tab:red", label=f"fp8 ({sf['tokens_per_s'] / 1e3:.1f}k tok/s)")
    if val:
        ax1.scatter(list(val), [v["bf16"] for v in val.values()], color="tab:blue", marker="o", label="val bf16")
        ax1.scatter(list(val), [v["fp8"] for v in val.values()], color="tab:red", marker="x", label="val fp8")
    ax1.set_ylabel("loss")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("bf16 vs fp8 training (thin: per step; thick: 10-step mean)")
    ax2.plot(steps, [100 * x for x in raw], color="gray", alpha=0.4, lw=0.8, label="per step")
    ax2.plot(steps, [100 * x for x in smooth], color="black", label=f"{SMOOTH}-step mean")
    ax2.axhspan(-1, 1, color="tab:green", alpha=0.1, label="within 1%")
    ax2.axvline(args.after, color="gray", ls=":", lw=1)
    ax2.set_ylabel("fp8 vs bf16 loss (%)")
    ax2.set_xlabel("step")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "fp8_quality.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
