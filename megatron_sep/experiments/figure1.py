"""The SepLLM paper's Figure 1 for a sweep: validation loss against training FLOPs and training seconds, and
the compute each run needs to reach the reference run's final loss.

FLOPs are the trainer's MFU counting (6 x matmul parameters + 12 x layers x hidden x seq x kept pairs per
token; kept pairs as logged with each step line). Seconds are the trainer's training time: each logged
interval's tokens over its tokens/s, so evaluation and checkpoint saves are left out; the first interval,
which holds compilation and warm-up, is counted at the median speed of the others (a one-off cost that a
full-length run would not notice, and that differs between attention kernels)."""

from __future__ import annotations

import math
import statistics


def compute_curve(train: list[dict], val: list[dict], per_step: int) -> list[dict]:
    """Each validation point with the FLOPs and seconds spent up to its step."""
    marks, step, flops, secs = [(0, 0.0, 0.0)], 0, 0.0, 0.0
    records = sorted(train, key=lambda r: r["step"])
    steady = statistics.median(r["tokens_per_s"] for r in records[1:]) if len(records) > 1 else None
    for i, r in enumerate(records):
        if r["step"] <= step:  # a resumed run logs a step again: keep the first
            continue
        tokens = (r["step"] - step) * per_step
        flops += tokens * r["flops_per_token"]
        secs += tokens / (steady if i == 0 and steady else r["tokens_per_s"])
        step = r["step"]
        marks.append((step, flops, secs))
    points = []
    for v in val:
        f, s = _at(marks, v["step"])
        points.append(
            {
                "step": v["step"],
                "tokens": v["step"] * per_step,
                "flops": f,
                "seconds": s,
                "val_loss": v["val_loss"],
            }
        )
    return points


def _at(marks, step):
    """FLOPs and seconds at a step, linear between logged steps (a validation step may fall between them)."""
    for (s0, f0, t0), (s1, f1, t1) in zip(marks, marks[1:]):
        if s0 <= step <= s1:
            w = (step - s0) / (s1 - s0)
            return f0 + w * (f1 - f0), t0 + w * (t1 - t0)
    return marks[-1][1], marks[-1][2]


def reach(points: list[dict], loss: float, key: str) -> float | None:
    """The `key` (flops or seconds) at which the validation curve first reaches `loss`, linear between
    evaluations; None when it never does."""
    prev = None
    for p in points:
        if p["val_loss"] <= loss:
            if prev is None:
                return p[key]
            w = (prev["val_loss"] - loss) / (prev["val_loss"] - p["val_loss"])
            return prev[key] + w * (p[key] - prev[key])
        prev = p
    return None


def ratios(rows: list[dict], reference: str) -> dict:
    """Per run, against the reference run (dense): the reference's total FLOPs / seconds over what the run
    needed to reach the reference's final loss (> 1: the run got there cheaper), and the paper's form, what
    the reference needed to reach the run's final loss over the run's total (> 1: the reference needs more)."""
    ref = next(r for r in rows if r["run"] == reference)["curve"]
    out = {}
    for r in rows:
        if r["run"] == reference:
            continue
        c, entry = r["curve"], {}
        for key in ("flops", "seconds"):
            got = reach(c, ref[-1]["val_loss"], key)
            entry[f"{key}_to_reference_loss"] = got
            entry[f"reference_{key}_over_run_{key}"] = ref[-1][key] / got if got else None
            back = reach(ref, c[-1]["val_loss"], key)
            entry[f"reference_{key}_to_run_loss"] = back
            entry[f"paper_form_{key}"] = back / c[-1][key] if back else None
        out[r["run"]] = entry
    return out


def describe(rows: list[dict], reference: str, table: dict) -> list[str]:
    """Markdown lines: the ratios, with 'not reached' said plainly."""

    def x(v):
        return f"{v:.2f}x" if v is not None and math.isfinite(v) else "not reached"

    lines = [
        f"| run | reaches {reference}'s final loss at (FLOPs / time) | {reference}'s FLOPs / run's | "
        f"{reference}'s time / run's | {reference} needs to reach the run's final loss (FLOPs / time) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["run"] == reference:
            continue
        t = table[r["run"]]
        at = (
            f"{t['flops_to_reference_loss']:.3g} / {t['seconds_to_reference_loss']:.0f} s"
            if t["flops_to_reference_loss"]
            else "not reached"
        )
        lines.append(
            f"| {r['run']} | {at} | {x(t['reference_flops_over_run_flops'])} | "
            f"{x(t['reference_seconds_over_run_seconds'])} | {x(t['paper_form_flops'])} / "
            f"{x(t['paper_form_seconds'])} |"
        )
    return lines


def plot(out, rows: list[dict], reference: str):
    import matplotlib.pyplot as plt

    from ..inference.plots import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    target = next(r for r in rows if r["run"] == reference)["curve"][-1]["val_loss"]
    for r in rows:
        c = r["curve"]
        a.plot([p["flops"] for p in c], [p["val_loss"] for p in c], "o-", ms=3, label=r["run"])
        b.plot([p["seconds"] for p in c], [p["val_loss"] for p in c], "o-", ms=3, label=r["run"])
    for ax in (a, b):
        ax.axhline(target, color="grey", lw=0.8, ls="--")
    a.set_xlabel("training FLOPs (kept pairs only)")
    a.set_ylabel("validation loss")
    a.set_title(f"Loss vs compute (dashed: {reference}'s final loss)")
    a.grid(alpha=0.3)
    return save_figure(
        fig,
        b,
        out / "val_loss_vs_flops_time.png",
        xlabel="training seconds (eval, saves excluded)",
        ylabel="validation loss",
        title="Loss vs wall-clock",
    )
