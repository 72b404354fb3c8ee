"""PNG plots of an evaluation (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_by_position(result: dict, path: Path) -> Path:
    per_pos = result["per_position"]
    mids = [(b["start"] + b["end"] - 1) / 2 for b in result["buckets"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(per_pos)), per_pos, color="0.75", lw=0.8, label="per position")
    ax.plot(mids, [b["loss"] for b in result["buckets"]], "o-", color="C0", label="bucket mean")
    ax.set(xlabel="token position in the sequence", ylabel="next-token loss (nats)",
           title="Loss by position: does the model use long context?")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_streaming(runs: list[dict], out: Path) -> list[Path]:
    """Perplexity per segment and KV memory vs tokens processed, one line per cache."""
    paths = [out / "streaming_ppl.png", out / "kv_memory.png"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ends = [s["start"] + s["tokens"] for s in r["segments"]]
        ax.plot(ends, [s["ppl"] for s in r["segments"]], "o-", ms=3, label=label(r))
    ax.set(xlabel="tokens processed", ylabel=f"perplexity per {runs[0]['segment']} tokens",
           title="Streaming perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot([t for t, _ in r["kv_bytes"]], [b / 2 ** 20 for _, b in r["kv_bytes"]], label=label(r))
    ax.set(xlabel="tokens processed", ylabel="KV cache held (MiB, all layers)", title="KV memory")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def label(run: dict) -> str:
    if run["cache"] == "full":
        return "full cache"
    a, s, w, c = run["sizes"]
    if run["cache"] == "streaming":
        return f"StreamingLLM a={a} w={w} c={c}"
    return f"SepCache a={a} s={s} w={w} c={c}"
