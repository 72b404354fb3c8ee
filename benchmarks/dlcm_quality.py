"""DLCM against a dense model at equal training FLOPs, through the Trainer (issue 37; docs/dlcm.md).

  # on the GPU, one run per call (each fits a device call): trains, then scores held-out tokens
  python3 benchmarks/dlcm_quality.py train dense --dense-tokens 50M --data .carry/offline --out $OUT
  python3 benchmarks/dlcm_quality.py train dlcm --dense-tokens 50M --data .carry/offline --out $OUT \
      --dense-losses .carry/dlcm/positions_dense.npz
  # anywhere: the report from what the calls returned
  python3 benchmarks/dlcm_quality.py report DIR --out DIR

Every run has the same data, seed, batch (32 x 2048) and schedule shape. The dense run trains on
--dense-tokens; each DLCM run trains as many steps as that budget of FLOPs buys at its FLOPs per token
(training/metrics.py, at the target ratio). `train` also scores the same held-out sequences token by token
(positions_RUN.npz); a DLCM run adds where each token sits inside its concept, and with --dense-losses the
dense model's losses on the same tokens, for the loss by position inside a concept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

BASE = "configs/experiments/dlcm_vs_dense.yaml"
DLCM = [
    "model.arch=dlcm",
    "model.num_layers=6",
    "model.hidden_size=512",
    "model.num_heads=8",
    "dlcm.encoder_layers=4",
    "dlcm.concept_layers=12",
    "dlcm.concept_hidden_size=1024",
    "dlcm.concept_heads=16",
    "dlcm.target_ratio=4",
]
RUNS = {
    "dense": [],
    "dlcm": DLCM,
    "dlcm_sep": DLCM + ["dlcm.boundary=separator"],
    "dlcm_fixed": DLCM + ["dlcm.boundary=fixed"],
}
RUNS["dense_tokens"] = []  # dense, as many tokens as the dlcm run: the equal-tokens comparison
EQUAL_TOKENS = {"dense_tokens": "dlcm"}
SCORED = 32  # held-out sequences scored token by token


def tokens_arg(text: str) -> int:
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def config(run: str, data: str, extra=()):
    from megatron_sep.config import load_config

    sets = RUNS[run] + [
        f"data.tokenizer={data}/tokenizer.model",
        f"data.paths=[{data}/train_text_document]",
        f"train.run_dir=runs/dlcm_quality/{run}",
        *extra,
    ]
    return load_config(BASE, sets), sets


def flops_per_token(cfg) -> float:
    from megatron_sep.model import build_model
    from megatron_sep.training.metrics import flops_per_token as fpt, matmul_params

    cfg.model.vocab_size = cfg.model.vocab_size or 32000  # the offline corpus's tokenizer
    cfg.attention.separators = [0]  # ids: only the shapes matter here
    with __import__("torch").device("meta"):
        n = matmul_params(build_model(cfg))
    return fpt(cfg, n)


def steps_for(run: str, data: str, dense_tokens: int) -> tuple[int, dict]:
    """Steps that spend the dense run's FLOPs (dense: its tokens / tokens per step)."""
    dense, _ = config("dense", data)
    mine, _ = config(run, data)
    per_step = dense.train.global_batch_size * dense.data.seq_len
    budget = dense_tokens * flops_per_token(dense)
    f = flops_per_token(mine)
    steps = round(budget / f / per_step)
    if run in EQUAL_TOKENS:
        steps = steps_for(EQUAL_TOKENS[run], data, dense_tokens)[0]
        budget = steps * per_step * f
    return steps, {"flops_per_token": f, "budget_flops": budget, "tokens": steps * per_step}


def cmd_train(args) -> int:
    run, out = args.run, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xz = Path(args.data) / "train_text_document.bin.xz"
    if xz.exists() and not xz.with_suffix("").exists():
        subprocess.run(["xz", "-d", "-k", "-T0", str(xz)], check=True)
    steps, plan = steps_for(run, args.data, tokens_arg(args.dense_tokens))
    cfg, sets = config(run, args.data, [f"train.steps={steps}", *args.set])
    (out / f"plan_{run}.json").write_text(
        json.dumps({"run": run, "steps": steps, **plan}, indent=1)
    )
    cmd = [sys.executable, "-m", "megatron_sep", "train", "--config", BASE]
    for s in sets:
        cmd += ["--set", s]
    with open(out / f"train_{run}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    run_dir = Path(cfg.train.run_dir)
    if (run_dir / "metrics.jsonl").exists():
        (out / f"metrics_{run}.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    if code != 0:
        print(f"training {run} failed ({code}); see train_{run}.log", file=sys.stderr)
        return code
    score(run_dir, out / f"positions_{run}.npz", args.dense_losses)
    return 0


def score(run_dir: Path, path: Path, dense_losses: str | None) -> None:
    """Per-token losses on SCORED held-out sequences; for DLCM, each token's place inside its concept."""
    import torch
    import torch.nn.functional as F

    from megatron_sep.checkpoint.load import load_model
    from megatron_sep.data.dataset import run_datasets, sample_batch
    from megatron_sep.inference.evaluate import autocast_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(run_dir)
    model.to(device).eval()
    cfg.train.eval_iters, cfg.train.micro_batch_size = SCORED, 1  # the same sequences in every run
    valid = run_datasets(cfg)[1]
    out = {"losses": [], "offset": [], "length": []}
    with torch.no_grad(), autocast_for(device):
        for i in range(0, SCORED, 8):
            tokens, labels = sample_batch(valid, i, 8, device)
            logits = model(tokens).float()
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            out["losses"].append(loss.view_as(labels).cpu().numpy())
            if cfg.model.arch == "dlcm":
                pos = torch.arange(tokens.shape[1], device=device)
                _, b = model.route(model.encode(tokens), tokens, pos, None)
                seg = b.long().cumsum(1) - 1
                start = torch.cummax(torch.where(b, pos, 0), 1).values
                length = torch.zeros_like(seg).scatter_add_(1, seg, torch.ones_like(seg))
                out["offset"].append((pos - start).cpu().numpy())
                out["length"].append(torch.gather(length, 1, seg).cpu().numpy())
    arrays = {k: np.concatenate(v) for k, v in out.items() if v}
    if dense_losses:
        arrays["dense_losses"] = np.load(dense_losses)["losses"]
    np.savez_compressed(path, **arrays)


def read_metrics(path: Path) -> dict:
    train, val, concepts = {}, {}, {}
    for line in open(path):
        r = json.loads(line)
        if "tokens_per_s" in r:
            train[r["step"]] = r
        if "val_loss" in r:
            val[r["step"]] = r["val_loss"]
        if "concept_ratio" in r:
            concepts[r["step"]] = r
    return {"train": train, "val": val, "concepts": concepts}


def cmd_report(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, out = Path(args.dir), Path(args.out)
    runs = {}
    for plan in sorted(src.glob("plan_*.json")):
        p = json.loads(plan.read_text())
        m = src / f"metrics_{p['run']}.jsonl"
        if m.exists():
            runs[p["run"]] = {**p, **read_metrics(m)}
    per_step = 32 * 2048
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = []
    for name, r in runs.items():
        steps = sorted(r["val"])
        # FLOPs as trained: each logged interval at its realised ratio (DLCM), else the plan's
        flops = {s: s * per_step * r["flops_per_token"] for s in steps}
        axes[0].plot([flops[s] for s in steps], [r["val"][s] for s in steps], label=name)
        axes[1].plot([s * per_step for s in steps], [r["val"][s] for s in steps], label=name)
        speeds = [t["tokens_per_s"] for s, t in sorted(r["train"].items())][2:]
        mfus = [t["mfu"] for s, t in sorted(r["train"].items()) if t.get("mfu")][2:]
        ratios = [c["concept_ratio"] for c in r["concepts"].values()]
        rows.append(
            {
                "run": name,
                "steps": r["steps"],
                "tokens": r["tokens"],
                "flops_per_token": r["flops_per_token"],
                "final_val_loss": r["val"][steps[-1]] if steps else None,
                "tokens_per_s": statistics.median(speeds) if speeds else None,
                "mfu": statistics.median(mfus) if mfus else None,
                "ratio_first": ratios[0] if ratios else None,
                "ratio_last_10pct": statistics.fmean(ratios[-max(1, len(ratios) // 10) :])
                if ratios
                else None,
            }
        )
    for ax, xl in zip(axes, ("training FLOPs", "training tokens")):
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "dlcm_val_loss.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        if r["concepts"]:
            ax.plot(
                list(r["concepts"]),
                [c["concept_ratio"] for c in r["concepts"].values()],
                label=name,
            )
    ax.axhline(4.0, color="gray", ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("realised tokens per concept")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "dlcm_ratio.png", dpi=120)
    positions = position_report(src, out, plt)
    (out / "dlcm_quality.json").write_text(
        json.dumps({"runs": rows, "positions": positions}, indent=1)
    )
    print(json.dumps(rows, indent=1))
    return 0


def position_report(src: Path, out: Path, plt) -> dict:
    """Mean loss by the token's offset inside its concept (segments of 3-6 tokens), DLCM against the
    dense model on the same tokens (dashed, same colour): one panel per DLCM run."""
    result = {}
    paths = sorted(src.glob("positions_dlcm*.npz"))
    if not paths:
        return result
    fig, axes = plt.subplots(1, len(paths), figsize=(6 * len(paths), 4.5), squeeze=False)
    for ax, path in zip(axes[0], paths):
        z = np.load(path)
        name = path.stem.removeprefix("positions_")
        for i, length in enumerate((3, 4, 5, 6)):
            sel = z["length"] == length
            if sel.sum() < 200:
                continue
            mine = [float(z["losses"][sel & (z["offset"] == o)].mean()) for o in range(length)]
            entry = {"dlcm": mine, "count": int(sel.sum())}
            ax.plot(range(length), mine, marker="o", color=f"C{i}", label=f"segments of {length}")
            if "dense_losses" in z.files:
                dense = [
                    float(z["dense_losses"][sel & (z["offset"] == o)].mean()) for o in range(length)
                ]
                entry["dense"] = dense
                ax.plot(range(length), dense, ls="--", marker="x", color=f"C{i}", alpha=0.6)
            result[f"{name}_len{length}"] = entry
        ax.set_title(f"{name} (solid) and dense on the same tokens (dashed)", fontsize=9)
        ax.set_xlabel("offset of the token inside its concept")
        ax.set_ylabel("mean next-token loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "dlcm_loss_by_offset.png", dpi=120)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("run", choices=sorted(RUNS))
    t.add_argument("--dense-tokens", required=True)
    t.add_argument("--data", default="data/offline")
    t.add_argument("--out", required=True)
    t.add_argument(
        "--dense-losses", help="positions_dense.npz of the dense run, for the same tokens"
    )
    t.add_argument("--set", action="append", default=[], help="extra config overrides")
    r = sub.add_parser("report")
    r.add_argument("dir")
    r.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    return cmd_train(args) if args.cmd == "train" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
