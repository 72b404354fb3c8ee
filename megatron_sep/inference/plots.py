"""PNG plots of an evaluation (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_by_position(result: dict, path: Path) -> Path:
    per_pos = result["per_position"]
    mids = bucket_mids(result["buckets"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(per_pos)), per_pos, color="0.75", lw=0.8, label="per position")
    ax.plot(mids, [b["loss"] for b in result["buckets"]], "o-", color="C0", label="bucket mean")
    return save_figure(
        fig,
        ax,
        path,
        xlabel="token position in the sequence",
        ylabel="next-token loss (nats)",
        title="Loss by position: does the model use long context?",
    )


def bucket_mids(buckets: list[dict]) -> list[float]:
    """The middle position of each loss-by-position bucket (evaluate.loss_by_position)."""
    return [(b["start"] + b["end"] - 1) / 2 for b in buckets]


def plot_streaming(runs: list[dict], out: Path, reference: dict | None = None) -> list[Path]:
    """Perplexity and tokens/s per segment, and KV memory, vs tokens processed; one line per cache. The
    reference (no cache, training attention per block) is a dashed line on the perplexity plot."""
    seg = runs[0]["segment"]
    return [
        _lines(
            runs,
            out / "streaming_ppl.png",
            lambda r: _per_segment(r, "ppl"),
            f"perplexity per {seg} tokens",
            "Streaming perplexity",
            reference=reference,
        ),
        _lines(
            runs,
            out / "kv_memory.png",
            lambda r: ([t for t, _ in r["kv_bytes"]], [b / 2**20 for _, b in r["kv_bytes"]]),
            "KV cache held (MiB, all layers)",
            "KV memory",
            log=len(runs) > 1,
            allocated=True,
        ),
        _lines(
            runs,
            out / "streaming_speed.png",
            lambda r: _per_segment(r, "tokens_per_s"),
            f"tokens/s over each {seg} tokens",
            "Streaming speed",
        ),
    ] + (
        [
            _lines(
                runs,
                out / "streaming_ppl_ratio.png",
                lambda r: _unzip(ppl_over_reference(r, reference)),
                "perplexity / no-cache perplexity, per segment",
                "Streaming perplexity against the reference",
            )
        ]
        if reference
        else []
    )


def ppl_over_reference(run: dict, reference: dict) -> list[tuple[int, float]]:
    """(tokens processed, ppl / the reference's ppl) per whole segment: one cut short by --time-limit would
    compare unlike text."""
    return [
        (s["start"] + s["tokens"], s["ppl"] / r["ppl"])
        for s, r in zip(run["segments"], reference["segments"])
        if s["tokens"] == r["tokens"]
    ]


def _unzip(pairs):
    return [x for x, _ in pairs], [y for _, y in pairs]


def _per_segment(run: dict, key: str):
    return [s["start"] + s["tokens"] for s in run["segments"]], [s[key] for s in run["segments"]]


def _lines(
    runs,
    path: Path,
    xy,
    ylabel: str,
    title: str,
    log: bool = False,
    reference=None,
    allocated: bool = False,
) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    if reference:
        x, y = _per_segment(reference, "ppl")
        ax.plot(
            x,
            y,
            "k--",
            lw=1,
            label=f"no cache: training attention per {reference['seq_len']}-token block",
        )
    for r in runs:
        x, y = xy(r)
        stop = f" (stopped: {r['stopped']})" if r.get("stopped") else ""
        (line,) = ax.plot(x, y, "o-" if len(x) < 64 else "-", ms=3, label=label(r) + stop)
        if allocated and r.get("kv_allocated_bytes") and x:  # the fixed-shape cache's buffers
            ax.hlines(
                r["kv_allocated_bytes"] / 2**20,
                x[0],
                x[-1],
                colors=line.get_color(),
                linestyles=":",
                label=f"{label(r)}: buffers allocated",
            )
    if log:  # a bounded cache and a full one differ by orders of magnitude
        ax.set_yscale("log")
    elif allocated:  # memory from zero: flat reads as flat
        ax.set_ylim(bottom=0)
    return save_figure(fig, ax, path, xlabel="tokens processed", ylabel=ylabel, title=title)


def save_figure(fig, ax, path: Path, legend: bool = True, **labels) -> Path:
    ax.set(**labels)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def label(run: dict) -> str:
    if run["cache"] == "full":
        return "full cache"
    a, s, w, c = run["sizes"]
    if run["cache"] == "streaming":
        return f"StreamingLLM a={a} w={w} c={c}"
    return f"SepCache a={a} s={s} w={w} c={c}"


def plot_loss_by_distance(result: dict, path: Path) -> Path:
    """Loss by copy distance (probes.copy_distance): one point per bucket at its tokens' mean distance, with
    its bootstrap interval; the "none" bucket (nothing to copy) as a band; the model's window as a line."""
    fig, ax = plt.subplots(figsize=(7, 4))
    seen = [b for b in result["buckets"] if b["start"] is not None and b["tokens"]]
    x, y = [b["mean_distance"] for b in seen], [b["loss"] for b in seen]
    err = [[b["loss"] - b["ci"][0] for b in seen], [b["ci"][1] - b["loss"] for b in seen]]
    ax.errorbar(
        x,
        y,
        yerr=err,
        fmt="o-",
        color="C0",
        capsize=3,
        label="copyable: bucket mean, 95% bootstrap",
    )
    for b, xi in zip(seen, x):  # above the error bar, clear of it
        ax.annotate(
            f"{b['tokens']:,} tok",
            (xi, b["ci"][1]),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=6,
            color="0.3",
        )
    none = result["buckets"][-1]
    if none["tokens"]:
        ax.axhline(
            none["loss"],
            color="0.4",
            ls="--",
            lw=1,
            label=f"nothing to copy ({none['tokens']:,} tokens)",
        )
        ax.axhspan(*none["ci"], color="0.4", alpha=0.15)
    _window_lines(ax, result["window"], result["reach"])
    _distance_axis(ax, result["edges"], x)
    return save_figure(
        fig,
        ax,
        path,
        xlabel="distance from the query back to the copyable answer (tokens)",
        ylabel="next-token loss (nats)",
        title="Loss by copy distance: is the answer used when far?",
    )


def plot_passkey(result: dict, path: Path) -> Path:
    """Passkey accuracy vs distance, with Wilson 95% intervals, first-digit accuracy and both chance levels;
    a line where the key's digits leave the model's window."""
    rows = result["distances"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["distance"] for r in rows]
    err = [[r["accuracy"] - r["ci"][0] for r in rows], [r["ci"][1] - r["accuracy"] for r in rows]]
    ax.errorbar(
        x,
        [r["accuracy"] for r in rows],
        yerr=err,
        fmt="o-",
        color="C0",
        capsize=3,
        label=f"exact 5 digits ({result['trials']} trials, 95% interval)",
    )
    ax.plot(
        x,
        [r["first_digit"] for r in rows],
        "s--",
        color="C1",
        ms=5,
        mfc="none",
        zorder=3,
        label="first digit",
    )
    ax.axhline(
        result["first_digit_chance"], color="C1", lw=0.8, ls=":", label="chance, first digit (0.1)"
    )
    ax.axhline(result["chance"], color="C0", lw=0.8, ls=":", label="chance, exact (1e-5)")
    # the key's last digit is (key_reach - distance) tokens further back than the filler: shift the lines so
    # they mark the filler distance at which the digits leave the window
    extra = sum(r["key_reach"] - r["distance"] for r in rows) / len(rows)
    _window_lines(ax, result["window"], result["reach"], shift=extra)
    _distance_axis(ax, x)
    ax.set_ylim(-0.05, 1.05)
    return save_figure(
        fig,
        ax,
        path,
        xlabel="filler tokens between the key and the question",
        ylabel="accuracy",
        title="Passkey retrieval by distance",
    )


def _window_lines(ax, window, reach, shift: float = 0.0) -> None:
    """The model's window (and, for StreamingLLM, the reach of all its layers' windows) on a distance axis
    whose distances are `shift` tokens short of the key's."""
    for n, style, what in ((window, "-", "window"), (reach, "--", "reach of all layers' windows")):
        if n is None:
            continue
        if n - shift > 0:
            where = ": where the key's digits leave it" if shift else ""
            ax.axvline(n - shift, color="C3", lw=1, ls=style, label=f"{what} ({n}){where}")
        else:  # the fixed text alone is longer: say so rather than draw nothing
            ax.plot(
                [],
                [],
                color="C3",
                lw=1,
                ls=style,
                label=f"{what} ({n}): the key is beyond it at every distance",
            )


def _distance_axis(ax, ticks, points=()) -> None:
    """Log distances with 0 a real value: symlog (linear below 1), ticks at the given distances (the largest
    first; one too close to a kept one is left unlabelled); limits around the ticks and points."""
    ax.set_xscale("symlog", linthresh=1)
    ticks = sorted({float(t) for t in ticks})
    span = ticks + [float(p) for p in points]
    # a point at 0 shows whole
    ax.set_xlim(-0.4 if min(span) < 1 else min(span) / 1.4, max(span) * 1.4)
    kept = []
    for t in reversed(ticks):
        if not kept or (t < 1 <= kept[-1]) or (t >= 1 and kept[-1] / t >= 1.35):
            kept.append(t)
    ax.set_xticks(kept, [f"{t:g}" for t in kept])
    ax.minorticks_off()
