"""How large a Llama-shaped model one GPU trains at seq 4096: the native engine against DeepSpeed ZeRO-3
with the optimizer (fp32 masters and Adam states) in CPU memory, through the Trainer's own step.

  PYTHONPATH=. python3 benchmarks/engine_memory.py --out DIR --runs native:32,native:40 deepspeed:24
  PYTHONPATH=. python3 benchmarks/engine_memory.py --out DIR --report     # table + PNG from DIR/rows.jsonl

Shape: Llama 7B's layer (hidden 4096, 32 heads, FFN 11008, vocab 32000) with a varying number of layers
(32 layers = 6.74B parameters). SepLLM attention (n=256, 3 initial tokens, 10% of the random tokens are
separators), bf16, full activation checkpointing, micro-batch 1 x `--accumulate` per step, data.mock.
Each run is its own process, so one that runs out of memory leaves nothing behind for the next. A row
holds tokens/s (median step after `--warmup` steps), the peak GPU memory (allocated and reserved), the
peak host RSS, and the time to build; or the failure (GPU out of memory, killed by the host).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPE = {
    "family": "llama",
    "hidden_size": 4096,
    "num_heads": 32,
    "ffn_hidden_size": 11008,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
SEQ = 4096


def params_of(layers: int) -> float:
    h, f, v = SHAPE["hidden_size"], SHAPE["ffn_hidden_size"], SHAPE["vocab_size"]
    return layers * (4 * h * h + 3 * h * f + 2 * h) + 2 * v * h + h


def child(engine: str, layers: int, steps: int, warmup: int, accumulate: int, run_dir: str) -> dict:
    import torch

    from megatron_sep.config import config_from_dict
    from megatron_sep.training import Trainer

    parallel = (
        {"engine": "deepspeed", "zero": 3, "offload": "optimizer"} if engine == "deepspeed" else {}
    )
    cfg = config_from_dict(
        {
            "model": {**SHAPE, "num_layers": layers},
            "attention": {
                "kind": "sepllm",
                "window": 256,
                "init_tokens": 3,
                "separators": list(range(1, SHAPE["vocab_size"] // 10)),
            },
            "parallel": parallel,
            "data": {"seq_len": SEQ, "mock": True},
            "train": {
                "run_dir": run_dir,
                "micro_batch_size": 1,
                "global_batch_size": accumulate,
                "steps": 10_000,
                "activation_checkpointing": "full",
                "precision": "bf16",
            },
            "optim": {"warmup_steps": 2},
        }
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log=False)
    build = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = trainer.train_step()
        loss.item()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step = statistics.median(times[warmup:])
    return {
        "status": "ok",
        "tokens_per_s": accumulate * SEQ / step,
        "step_s": step,
        "loss": loss.item(),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "build_s": build,
        "step_times": times,
    }


def run_one(spec: str, args) -> dict:
    engine, layers = spec.split(":")
    row = {
        "engine": engine,
        "layers": int(layers),
        "params_b": params_of(int(layers)) / 1e9,
        "zero": 3 if engine == "deepspeed" else 0,
        "offload": "optimizer" if engine == "deepspeed" else "none",
        "seq": SEQ,
        "tokens_per_step": args.accumulate * SEQ,
    }
    cmd = [
        sys.executable,
        __file__,
        "--child",
        spec,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--accumulate",
        str(args.accumulate),
        "--out",
        args.out,
    ]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        out = [line for line in r.stdout.splitlines() if line.startswith("ROW ")]
        if out:
            row.update(json.loads(out[-1][4:]))
        elif "OutOfMemoryError" in r.stderr or "CUDA out of memory" in r.stderr:
            row.update(status="gpu_oom", error=r.stderr.strip().splitlines()[-1][:300])
        elif r.returncode < 0:
            row.update(status=f"killed (signal {-r.returncode}; host memory)")
        else:
            row.update(status="error", error=(r.stderr.strip().splitlines() or ["?"])[-1][:300])
        if row["status"] != "ok":
            with open(os.path.join(args.out, f"stderr_{engine}_{layers}.txt"), "w") as f:
                f.write(r.stderr[-20000:])
    except subprocess.TimeoutExpired:
        row.update(status=f"timeout after {args.timeout} s")
    row["wall_s"] = time.perf_counter() - t0
    return row


def report(out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(os.path.join(out, "rows.jsonl"))]
    lines = [
        "| engine | layers | params | tokens/step | status | tokens/s | step s | peak GPU alloc GiB | "
        "GPU reserved GiB | host peak GiB | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["status"] == "ok"
        name = "native" if r["engine"] == "native" else "DeepSpeed ZeRO-3 + optimizer offload"
        lines.append(
            f"| {name} | {r['layers']} | {r['params_b']:.2f}B | {r['tokens_per_step']:,} | {r['status']} | "
            + (
                f"{r['tokens_per_s']:,.0f} | {r['step_s']:.2f} | {r['peak_gpu_gib']:.1f} | "
                f"{r['reserved_gib']:.1f} | {r['host_peak_gib']:.1f} | {r['build_s']:.0f} |"
                if ok
                else "- | - | - | - | - | - |"
            )
        )
    open(os.path.join(out, "engine_memory.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for engine, color in (("native", "tab:blue"), ("deepspeed", "tab:orange")):
        ok = [r for r in rows if r["engine"] == engine and r["status"] == "ok"]
        bad = [r for r in rows if r["engine"] == engine and r["status"] != "ok"]
        label = "native" if engine == "native" else "DeepSpeed ZeRO-3 + optimizer offload"
        axes[0].plot(
            [r["params_b"] for r in ok],
            [r["peak_gpu_gib"] for r in ok],
            "o-",
            color=color,
            label=label,
        )
        axes[0].plot(
            [r["params_b"] for r in ok],
            [r["host_peak_gib"] for r in ok],
            "s--",
            color=color,
            label=label + " (host RSS)",
        )
        for r in bad:
            axes[0].axvline(
                r["params_b"],
                color=color,
                ls=":",
                label=f"{label}: {r['status'][:24]} at {r['params_b']:.1f}B",
            )
        for acc in sorted({r["tokens_per_step"] for r in ok}):
            sub = [r for r in ok if r["tokens_per_step"] == acc]
            axes[1].plot(
                [r["params_b"] for r in sub],
                [r["tokens_per_s"] for r in sub],
                "o-" if acc == 16384 else "^",
                color=color,
                label=f"{label}, {acc:,} tokens/step",
            )
    axes[0].axhline(139, color="gray", lw=0.8)
    axes[0].axhline(125, color="gray", lw=0.8, ls="--")
    axes[0].set(
        xlabel="parameters (B)",
        ylabel="GiB",
        title="peak memory: GPU (line: 139 GiB) and host (dashed: 125 GiB)",
    )
    axes[1].set(xlabel="parameters (B)", ylabel="tokens/s", title=f"throughput, seq {SEQ}")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "engine_memory.png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--runs", nargs="*", default=[], help="engine:layers, e.g. native:32 deepspeed:24"
    )
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--accumulate", type=int, default=4, help="micro-batches of one sequence per step"
    )
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.child:
        engine, layers = args.child.split(":")
        row = child(
            engine,
            int(layers),
            args.steps,
            args.warmup,
            args.accumulate,
            os.path.join(args.out, f"run_{engine}_{layers}"),
        )
        print("ROW " + json.dumps(row), flush=True)
        return
    for spec in args.runs:
        row = run_one(spec, args)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "rows.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        # a bug, not a size limit: the larger runs would fail the same way
        if row["status"] == "error":
            break
    if args.report:
        report(args.out)


if __name__ == "__main__":
    main()
