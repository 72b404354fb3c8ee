"""The report of a sweep: SWEEP/report.md with one table and three PNG figures beside it.

Training-time numbers come from each run's metrics.jsonl; the attention statistics and the loss by
position are measured here on the same validation batches for every run (cached in the run directory)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..config import Config  # noqa: E402
from ..inference.plots import bucket_mids, save_figure  # noqa: E402
from ..training.metrics import flops_per_token, matmul_params  # noqa: E402
from . import figure1, probe_report  # noqa: E402
from .sweep import SHARED_NOTE  # noqa: E402

PASSKEY_TRIALS = 20
COLUMNS = (
    "run",
    "attention",
    "final val loss",
    "best val loss",
    "final val ppl",
    "tokens",
    "kept pairs",
    "kept KV at end",
    "attention FLOPs",
    "tokens/s",
    "MFU",
    "peak mem GB",
    "wall",
)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    train, val = [], []
    for line in open(run_dir / "metrics.jsonl"):
        r = {
            k: float("nan") if v is None else v for k, v in json.loads(line).items()
        }  # null: NaN or inf
        (train if "loss" in r else val if "val_loss" in r else []).append(r)
    return train, val


def eval_run(cfg: Config, device: torch.device) -> dict:
    """Loss by position and attention statistics on the validation batches (cached: sweep_eval.json)."""
    cache = Path(cfg.train.run_dir) / "sweep_eval.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from ..checkpoint import load_model
    from ..data.dataset import run_datasets, sample_batch
    from ..inference.evaluate import loss_by_position
    from ..model.attention import attention_stats, sep_inputs

    model, saved = load_model(cfg.train.run_dir)
    model.to(device)
    ds = run_datasets(saved)[1]
    iters, mb = saved.train.eval_iters, saved.train.micro_batch_size
    result = {
        "loss_by_position": loss_by_position(model, ds, iters, mb, device, buckets=16),
        "matmul_params": matmul_params(model),
    }
    tokens, _ = sample_batch(ds, 0, mb, torch.device("cpu"))
    # none for dense attention
    is_sep = sep_inputs(saved, tokens, model.sep_ids.cpu()).get("is_sep")
    result["stats"] = (
        attention_stats(saved, is_sep)
        if is_sep is not None
        else {"kept_pairs": 1.0, "kept_kv": 1.0, "sep_share": None}
    )
    result.update(run_probes(model, saved, ds, iters, mb, device))
    cache.write_text(json.dumps(result))
    return result


def run_probes(model, cfg: Config, ds, iters: int, mb: int, device) -> dict:
    """The beyond-window probes (inference/probes.py) on the validation batches; passkey filler from the
    validation samples. A mock-data run has no tokenizer: loss by copy distance only."""
    from ..data.tokenizer import load_tokenizer
    from ..inference.probes import Probes, copy_distance

    if cfg.data.mock or not cfg.data.tokenizer:
        return {"copy_distance": copy_distance(model, ds, iters, mb, device)}
    return Probes(cfg, load_tokenizer(cfg.data.tokenizer), trials=PASSKEY_TRIALS).run(
        model, ds, iters, mb, device
    )


def attention_label(cfg: Config) -> str:
    a = cfg.attention
    if a.kind == "dense":
        return "dense"
    hybrid = f", dense {a.hybrid}" if a.hybrid != "none" else ""
    return f"{a.kind} a={a.init_tokens} n={a.window}{hybrid}"


def collect(name: str, cfg: Config, state: dict, device: torch.device) -> dict:
    """One table row; state: the run's record in sweep.json (wall time, runs at once)."""
    train, val = read_metrics(Path(cfg.train.run_dir))
    ev = eval_run(cfg, device)
    per_step = cfg.train.samples_per_step * cfg.data.seq_len
    timed = train[1:] or train  # the first logged interval holds compilation and warm-up
    kept = ev["stats"]["kept_pairs"]
    n = ev["matmul_params"]
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "run": name,
        "attention": attention_label(cfg),
        "val": [(r["step"] * per_step, r["val_loss"]) for r in val],
        "final_val_loss": val[-1]["val_loss"],
        "best_val_loss": min(r["val_loss"] for r in val),
        "tokens": train[-1]["step"] * per_step,
        "kept_pairs": kept,
        "kept_kv": ev["stats"]["kept_kv"],
        "sep_share": ev["stats"]["sep_share"],
        "attention_flops_share": 1 - flops_per_token(cfg, n, 0.0) / flops_per_token(cfg, n, kept),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_mem_gb": max(r["peak_mem_gb"] for r in train),
        "wall_s": state.get("wall_s", 0.0),
        "parallel": state.get("parallel", 1),
        "kind": cfg.attention.kind,
        "curve": figure1.compute_curve(train, val, per_step),
        "loss_by_position": ev["loss_by_position"]["buckets"],
        "copy_distance": ev.get("copy_distance"),
        "passkey": ev.get("passkey"),
    }


def _cells(r: dict) -> list[str]:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no GPU peak)"
    return [
        r["run"],
        r["attention"],
        f"{r['final_val_loss']:.4f}",
        f"{r['best_val_loss']:.4f}",
        f"{math.exp(r['final_val_loss']):.2f}",
        f"{r['tokens']:,}",
        f"{r['kept_pairs']:.1%}",
        f"{r['kept_kv']:.1%}",
        f"{r['attention_flops_share']:.1%}",
        f"{r['tokens_per_s']:,.0f}",
        mfu,
        f"{r['peak_mem_gb']:.2f}",
        f"{r['wall_s'] / 60:.1f} min",
    ]


def write_report(
    out: Path, name: str, tokens: int, rows: list[dict], reference: dict, missing: list[str]
) -> Path:
    figs = [plot_val(out, rows), plot_positions(out, rows), plot_speed(out, rows)]
    order = sorted(rows, key=lambda r: r["final_val_loss"])
    trained = sorted({r["tokens"] for r in rows})
    lines = [
        f"# Sweep {name}: {len(rows)} run{'s' if len(rows) > 1 else ''}, a budget of {tokens:,} tokens each "
        f"({' / '.join(f'{t:,}' for t in trained)} trained: whole steps)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += [
        "",
        "Kept pairs: the share of causal (query, key) pairs attended; kept KV at end: the share of "
        "keys the last query attends; both measured on the same validation batches for every run. "
        "Attention FLOPs: the attention term's share of the training FLOPs per token (6 x matmul "
        "params + 12 x layers x hidden x seq x kept pairs). tokens/s and MFU: medians of the logged "
        "intervals after the first." + shared_note(rows),
        "",
        "**Ordering at this budget** (final validation loss, lower is better): "
        + " < ".join(f"{r['run']} ({r['final_val_loss']:.4f})" for r in order)
        + ".",
    ]
    if reference:
        ref = {k: v for k, v in reference.items() if isinstance(v, (int, float))}
        if ref:
            lines += [
                "",
                f"Reference ({reference.get('metric', 'reference metric')}): "
                + " < ".join(f"{k} ({v})" for k, v in sorted(ref.items(), key=lambda kv: kv[1]))
                + ".",
            ]
        if reference.get("note"):
            lines += ["", str(reference["note"])]
    compute = {}
    ref = reference_run(rows)
    if ref and len(rows) > 1:
        compute = figure1.ratios(rows, ref)
        figs.append(figure1.plot(out, rows, ref))
        lines += [
            "",
            f"**Compute to {ref}'s final loss** (the paper's Figure 1; FLOPs count kept pairs only, time "
            "is training time without evaluation, saves and compilation): ratios above 1 favour the run.",
            "",
        ]
        lines += figure1.describe(rows, ref, compute)
    gaps = probe_report.gap_rows(rows, ref)
    if gaps:
        lines += probe_report.lines(rows, ref, gaps)
        figs.append(probe_report.plot(out, rows))
    if missing:
        lines += ["", f"Not in this report (not finished): {', '.join(missing)}."]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in figs]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(
        json.dumps(
            {
                "name": name,
                "tokens": tokens,
                "reference_run": ref,
                "compute_to_reference_loss": compute,
                "copy_distance_gaps": gaps,
                "runs": rows,
            },
            indent=1,
        )
    )
    return path


def shared_note(rows: list[dict]) -> str:
    """Runs trained several at a time competed for the same cores, so their speeds say little."""
    shared = [r["run"] for r in rows if r["parallel"] > 1]
    if not shared:
        return ""
    return (
        f" **{', '.join(shared)}: {SHARED_NOTE}** (trained {max(r['parallel'] for r in rows)} at a time "
        "with `--parallel`; their tokens/s, MFU and wall time measure the sharing, not the run)."
    )


def reference_run(rows: list[dict]) -> str | None:
    """The dense run the others are measured against: one named vanilla, else the first dense one."""
    names = [r["run"] for r in rows if r["kind"] == "dense"]
    return "vanilla" if "vanilla" in names else names[0] if names else None


def plot_val(out: Path, rows: list[dict]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x, y = zip(*r["val"])
        ax.plot(x, y, "o-", ms=3, label=f"{r['run']} ({r['attention']})")
    return save_figure(
        fig,
        ax,
        out / "val_loss_vs_tokens.png",
        xlabel="training tokens",
        ylabel="validation loss",
        title="Validation loss at equal tokens",
    )


def plot_positions(out: Path, rows: list[dict]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        b = r["loss_by_position"]
        ax.plot(bucket_mids(b), [x["loss"] for x in b], "o-", ms=3, label=r["run"])
    return save_figure(
        fig,
        ax,
        out / "loss_by_position.png",
        xlabel="token position in the sequence",
        ylabel="next-token loss (validation)",
        title="Loss by position: who uses long context",
    )


def plot_speed(out: Path, rows: list[dict]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r["run"] for r in rows]
    bars = ax.bar(
        names, [r["tokens_per_s"] for r in rows], color=[f"C{i}" for i in range(len(rows))]
    )
    for bar, r in zip(bars, rows):
        ax.annotate(
            f"{r['kept_pairs']:.0%} pairs",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.tick_params(axis="x", rotation=20)
    shared = any(r["parallel"] > 1 for r in rows)
    return save_figure(
        fig,
        ax,
        out / "tokens_per_s.png",
        ylabel="training tokens/s (median)",
        title="Training speed (label: share of causal pairs attended)"
        + (f"\n{SHARED_NOTE}" if shared else ""),
        legend=False,
    )
