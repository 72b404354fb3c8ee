"""The sweep report's beyond-window section: loss by copy distance per run with the gap to the reference
(dense) run and its paired bootstrap 95% interval over the same held-out sequences, and passkey accuracy by
distance (inference/probes.py computes both)."""

from __future__ import annotations


def gap_rows(rows: list[dict], reference: str | None) -> dict:
    """Per run and copy-distance bucket: mean loss, and the gap to the reference with its 95% interval."""
    from ..inference.probes import paired_gap_ci

    ref = next(
        (r["copy_distance"] for r in rows if r["run"] == reference and r.get("copy_distance")), None
    )
    out = {}
    for r in rows:
        cd = r.get("copy_distance")
        if not cd:
            continue
        cells = []
        for k, b in enumerate(cd["buckets"]):
            cell = {"bucket": b["name"], "tokens": b["tokens"], "loss": b["loss"], "ci": b["ci"]}
            rb = ref["buckets"][k] if ref and r["run"] != reference else None
            if rb and b["tokens"] and rb["tokens"] and len(b["seq_sums"]) == len(rb["seq_sums"]):
                cell["gap"] = b["loss"] - rb["loss"]
                cell["gap_ci"] = list(paired_gap_ci(b, rb))
            cells.append(cell)
        out[r["run"]] = cells
    return out


def lines(rows: list[dict], reference: str | None, gaps: dict) -> list[str]:
    if not gaps:
        return []
    first = next(iter(gaps.values()))
    names = [c["bucket"] for c in first]
    seqs = next(len(r["copy_distance"]["buckets"][0]["seq_sums"]) for r in rows if r["run"] in gaps)
    out = [
        "",
        "**Beyond the window: loss by copy distance** (held-out tokens whose preceding bigram occurred "
        "earlier in the sequence followed by the same token, bucketed by how far back that answer is from the "
        "query; `none`: no earlier occurrence). Cells: mean loss, and for each run its gap to "
        f"{reference} with a paired bootstrap 95% interval over the {seqs} evaluated sequences (negative: better "
        "than the reference).",
        "",
        "| run | window | " + " | ".join(f"d {n}" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        if r["run"] not in gaps:
            continue
        cells = []
        for c in gaps[r["run"]]:
            if c["loss"] is None:
                cells.append("-")
            elif "gap" in c:
                lo, hi = c["gap_ci"]
                cells.append(f"{c['loss']:.3f} ({c['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}])")
            else:
                cells.append(f"{c['loss']:.3f}")
        w = r["copy_distance"].get("window")
        out.append(f"| {r['run']} | {w if w else 'dense'} | " + " | ".join(cells) + " |")
    out.append("| tokens per bucket | | " + " | ".join(f"{c['tokens']:,}" for c in first) + " |")
    keys = [r for r in rows if r.get("passkey")]
    if keys:
        dists = [d["distance"] for d in keys[0]["passkey"]["distances"]]
        trials = keys[0]["passkey"]["trials"]
        out += [
            "",
            f"**Passkey retrieval** (a 5-digit key in held-out text, d tokens before the question; greedy "
            f"through the model's own KV cache and mask; {trials} trials per distance; exact match, chance "
            "1e-5; first digit in brackets, chance 0.1):",
            "",
            "| run | " + " | ".join(f"d={d}" for d in dists) + " |",
            "|---|" + "---|" * len(dists),
        ]
        for r in keys:
            out.append(
                f"| {r['run']} | "
                + " | ".join(
                    f"{d['accuracy']:.2f} ({d['first_digit']:.2f})"
                    for d in r["passkey"]["distances"]
                )
                + " |"
            )
    return out


def plot(out, rows: list[dict]):
    import matplotlib.pyplot as plt

    from ..inference.plots import save_figure

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(rows):
        cd = r.get("copy_distance")
        if not cd:
            continue
        near = [b for b in cd["buckets"] if b["start"] is not None and b["tokens"]]
        x = [b["mean_distance"] for b in near]
        y = [b["loss"] for b in near]
        err = [[b["loss"] - b["ci"][0] for b in near], [b["ci"][1] - b["loss"] for b in near]]
        ax.errorbar(x, y, yerr=err, fmt="o-", ms=3, capsize=2, color=f"C{i}", label=r["run"])
        if cd.get("window"):
            ax.axvline(cd["window"], color=f"C{i}", lw=0.6, ls=":")
    ax.set_xscale("log")
    return save_figure(
        fig,
        ax,
        out / "loss_by_copy_distance.png",
        xlabel="distance back to the copyable answer (tokens, log; dotted: each run's window)",
        ylabel="mean loss (95% interval)",
        title="Copyable tokens: who uses what lies beyond the window",
    )
