"""Multi-GPU verification: the same model and data under several parallel layouts against one GPU.

On a 2-GPU machine (the device tool's nvidia-h200-x2):
  PYTHONPATH=. python3 benchmarks/multi_gpu.py --out DIR
For each attention kind (dense, sepllm) it trains configs/llama350m_mock.yaml for --steps steps on
one GPU and under (tp2), (pp2, 1f1b), (pp2, interleaved x2), (dp2, zero1), each with
torchrun (NCCL), and records per layout: the largest loss difference to the one-GPU run, tokens/s,
MFU and peak memory (medians over the steps after the first 5). Then a checkpoint saved under (tp2)
at the middle step resumes on one GPU, and its next loss is compared with the (tp2) run's.
Loss tolerance: bf16 autocast with reductions split differently across GPUs; over 50 steps the
runs drift apart by rounding, so |delta loss| <= --tol (default 0.05, ~0.5% of a loss near 10).
--preset tiny runs the same driver on CPU with gloo (tests/integration/test_training.py runs it that way). On the
device, PyYAML and tqdm are carried as wheels (see the device README).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

LAYOUTS = {
    "1gpu": (1, {}),
    "tp2": (2, {"parallel": {"tp": 2}}),
    "pp2_1f1b": (2, {"parallel": {"pp": 2, "schedule": "1f1b"}}),
    "pp2_interleaved": (2, {"parallel": {"pp": 2, "schedule": "interleaved", "virtual_stages": 2}}),
    "dp2_zero1": (2, {"parallel": {"zero": 1}}),
}
TINY = {
    "model": {
        "num_layers": 4,
        "hidden_size": 64,
        "num_heads": 4,
        "ffn_hidden_size": 128,
        "vocab_size": 512,
        "max_position_embeddings": 64,
    },
    "attention": {"window": 8},
    "data": {"seq_len": 64},
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "device": "cpu"},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def write_config(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train(cfg_path: Path, nproc: int, log: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_sep",
        "train",
        "-c",
        str(cfg_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        raise RuntimeError(
            f"{' '.join(cmd)} failed with {rc}; see {log}:\n" + log.read_text()[-3000:]
        )


def metrics(run_dir: Path, skip: int = 5) -> dict:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = {r["step"]: r for r in rows if "loss" in r}
    later = [r for s, r in steps.items() if s > skip] or list(steps.values())

    def med(key):
        vals = [r[key] for r in later if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    return {
        "loss": {s: r["loss"] for s, r in steps.items()},
        "tokens_per_s": med("tokens_per_s"),
        "mfu": med("mfu"),
        "peak_mem_gb": max(r["peak_mem_gb"] for r in later),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/multi_gpu")
    ap.add_argument("--config", default="configs/llama350m_mock.yaml")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--kinds", default="dense,sepllm")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--preset", choices=["full", "tiny"], default="full")
    args = ap.parse_args()
    out = Path(args.out)
    base = yaml.safe_load(open(args.config))
    if args.preset == "tiny":
        base = merge(base, TINY)
    vocab = base["model"]["vocab_size"]
    mid = args.steps // 2
    base = merge(
        base, {"train": {"steps": args.steps}, "checkpoint": {"save_interval": mid, "keep_last": 2}}
    )
    report = {"config": args.config, "steps": args.steps, "tolerance": args.tol, "runs": {}}
    for kind in args.kinds.split(","):
        attention = {"kind": kind}
        if kind == "sepllm":
            attention["separators"] = list(range(1, vocab // 10))
        runs = {}
        for name in args.layouts.split(","):
            nproc, extra = LAYOUTS[name]
            run_dir = out / f"{kind}_{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            raw = merge(
                merge(base, extra), {"attention": attention, "train": {"run_dir": str(run_dir)}}
            )
            train(
                write_config(out / "configs" / f"{kind}_{name}.yaml", raw),
                nproc,
                out / f"{kind}_{name}.log",
            )
            runs[name] = metrics(run_dir)
            one = runs.get("1gpu")
            if one:
                common = sorted(set(one["loss"]) & set(runs[name]["loss"]))
                runs[name]["max_abs_loss_diff_vs_1gpu"] = max(
                    abs(runs[name]["loss"][s] - one["loss"][s]) for s in common
                )
                runs[name]["tokens_per_s_x_1gpu"] = runs[name]["tokens_per_s"] / one["tokens_per_s"]
            print(
                json.dumps(
                    {
                        "kind": kind,
                        "layout": name,
                        **{k: v for k, v in runs[name].items() if k != "loss"},
                    }
                ),
                flush=True,
            )
        if "tp2" in runs:  # resume the (tp2) checkpoint of the middle step on one GPU
            src = out / f"{kind}_tp2" / "checkpoints" / f"step_{mid:08d}"
            run_dir = out / f"{kind}_tp2_resumed_1gpu"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(src, run_dir / "checkpoints" / src.name)
            (run_dir / "checkpoints" / "latest").write_text(src.name + "\n")
            raw = merge(
                base,
                {
                    "attention": attention,
                    "train": {"run_dir": str(run_dir), "steps": mid + 2},
                    "checkpoint": {"save_interval": 10_000},
                },
            )
            train(
                write_config(out / "configs" / f"{kind}_tp2_resumed.yaml", raw),
                1,
                out / f"{kind}_resume.log",
            )
            resumed = metrics(run_dir, skip=0)["loss"]
            runs["tp2_resumed_on_1gpu"] = {
                "step": mid + 1,
                "loss": resumed[mid + 1],
                "tp2_loss": runs["tp2"]["loss"][mid + 1],
                "abs_diff": abs(resumed[mid + 1] - runs["tp2"]["loss"][mid + 1]),
            }
            print(json.dumps({"kind": kind, "resume": runs["tp2_resumed_on_1gpu"]}), flush=True)
        report["runs"][kind] = runs
    out.mkdir(parents=True, exist_ok=True)
    (out / "multi_gpu.json").write_text(json.dumps(report, indent=1))
    failed = [
        f"{k}/{n}"
        for k, runs in report["runs"].items()
        for n, r in runs.items()
        if r.get("max_abs_loss_diff_vs_1gpu", 0) > args.tol or r.get("abs_diff", 0) > args.tol
    ]
    print("\nkind     layout             max|dloss|  tok/s      x1gpu  MFU    peak GB")
    for k, runs in report["runs"].items():
        for n, r in runs.items():
            if "tokens_per_s" in r:
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
                print(
                    f"{k:<8} {n:<18} {r.get('max_abs_loss_diff_vs_1gpu', 0):9.4f}  {r['tokens_per_s']:9,.0f}  "
                    f"{r.get('tokens_per_s_x_1gpu', 1):5.2f}  {mfu:>6} {r['peak_mem_gb']:7.1f}"
                )
    print("over tolerance:", failed or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
