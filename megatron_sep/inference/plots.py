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
    return save_figure(fig, ax, path, xlabel="token position in the sequence", ylabel="next-token loss (nats)",
                       title="Loss by position: does the model use long context?")


def bucket_mids(buckets: list[dict]) -> list[float]:
    """The middle position of each loss-by-position bucket (evaluate.loss_by_position)."""
    return [(b["start"] + b["end"] - 1) / 2 for b in buckets]


def plot_streaming(runs: list[dict], out: Path, reference: dict | None = None) -> list[Path]:
    """Perplexity and tokens/s per segment, and KV memory, vs tokens processed; one line per cache. The
    reference (no cache, training attention per block) is a dashed line on the perplexity plot."""
    seg = runs[0]["segment"]
    return [
        _lines(runs, out / "streaming_ppl.png", lambda r: _per_segment(r, "ppl"),
               f"perplexity per {seg} tokens", "Streaming perplexity", reference=reference),
        _lines(runs, out / "kv_memory.png", lambda r: ([t for t, _ in r["kv_bytes"]],
                                                       [b / 2 ** 20 for _, b in r["kv_bytes"]]),
               "KV cache held (MiB, all layers)", "KV memory", log=len(runs) > 1),
        _lines(runs, out / "streaming_speed.png", lambda r: _per_segment(r, "tokens_per_s"),
               f"tokens/s over each {seg} tokens", "Streaming speed"),
    ] + ([_lines(runs, out / "streaming_ppl_ratio.png", lambda r: _unzip(ppl_over_reference(r, reference)),
                 "perplexity / no-cache perplexity, per segment", "Streaming perplexity against the reference")]
         if reference else [])


def ppl_over_reference(run: dict, reference: dict) -> list[tuple[int, float]]:
    """(tokens processed, ppl / the reference's ppl) per whole segment: one cut short by --time-limit would
    compare unlike text."""
    return [(s["start"] + s["tokens"], s["ppl"] / r["ppl"]) for s, r in zip(run["segments"], reference["segments"])
            if s["tokens"] == r["tokens"]]


def _unzip(pairs):
    return [x for x, _ in pairs], [y for _, y in pairs]


def _per_segment(run: dict, key: str):
    return [s["start"] + s["tokens"] for s in run["segments"]], [s[key] for s in run["segments"]]


def _lines(runs, path: Path, xy, ylabel: str, title: str, log: bool = False, reference=None) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    if reference:
        x, y = _per_segment(reference, "ppl")
        ax.plot(x, y, "k--", lw=1, label=f"no cache: training attention per {reference['seq_len']}-token block")
    for r in runs:
        x, y = xy(r)
        stop = f" (stopped: {r['stopped']})" if r.get("stopped") else ""
        ax.plot(x, y, "o-" if len(x) < 64 else "-", ms=3, label=label(r) + stop)
    if log:  # a bounded cache and a full one differ by orders of magnitude
        ax.set_yscale("log")
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
