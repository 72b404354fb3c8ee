"""SUBLLM against the plain model of the same shape: training tokens/s and peak memory, same run, one GPU.

  PYTHONPATH=. python3 benchmarks/subllm_throughput.py --out DIR [--steps 8] [--compile] [--static]
      [--global-batch 2,8] [--profile]

Llama 1.3B shape (24 x 2048, 16 heads, FFN 5504, vocab 32000), dense attention (as in the SUBLLM paper),
seq 4096, micro-batch 2, bf16, data.mock, through the Trainer's own step. SUBLLM: structure
TTTTT(TTTTT(TTTT)TTTTT)TTTTT with keep 0.64 per level (the paper's 1.3B). Median step after 2 warm-up steps.
--static compiles without automatic dynamic shapes (each level's length gets its own static graph);
--global-batch accumulates micro-batches per optimizer step; --profile writes each variant's top kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from megatron_sep.config import config_from_dict
from megatron_sep.training import Trainer

from memory_model import LLAMA1B3  # benchmarks/ is on sys.path when this file runs as a script

MODEL = {**LLAMA1B3, "max_position_embeddings": 4096}
VARIANTS = {
    "dense": {},
    "subllm": {"structure": "TTTTT(TTTTT(TTTT)TTTTT)TTTTT", "subsample_keep": 0.64},
}
MICRO, SEQ = 2, 4096


def measure(name: str, args, global_batch: int) -> dict:
    cfg = config_from_dict(
        {
            "model": {**MODEL, **VARIANTS[name]},
            "data": {"seq_len": SEQ, "mock": True},
            "train": {
                "run_dir": f"/tmp/subllm_bench/{name}_gb{global_batch}",
                "micro_batch_size": MICRO,
                "global_batch_size": global_batch,
                "steps": 10_000,
                "compile": args.compile,
                "precision": "bf16",
            },
            "optim": {"warmup_steps": 2},
        }
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, log=False)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = trainer.train_step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t)
    step = statistics.median(times[2:])
    tokens = global_batch * SEQ
    row = {
        "variant": name,
        "tokens_per_s": tokens / step,
        "step_s": step,
        "compile": args.compile,
        "static": args.static,
        "tokens_per_step": tokens,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "losses": losses,
        "step_times": times,
    }
    if args.profile and global_batch == MICRO:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as pr:
            for _ in range(2):
                trainer.train_step()
            torch.cuda.synchronize()
        mode = "compiled" if args.compile else "eager"
        with open(os.path.join(args.out, f"profile_{name}_{mode}.txt"), "w") as f:
            f.write(
                pr.key_averages().table(
                    sort_by="cuda_time_total", row_limit=45, max_name_column_width=90
                )
            )
    del trainer
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--static", action="store_true", help="compile without automatic dynamic shapes"
    )
    ap.add_argument(
        "--global-batch",
        default="2",
        help="sequences per optimizer step (accumulation); a comma "
        "list runs each in turn, in one process (compiled graphs are reused)",
    )
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.static:
        torch._dynamo.config.automatic_dynamic_shapes = False  # as the Trainer compiles SUBLLM
    rows = []
    for gb in (int(g) for g in args.global_batch.split(",")):
        pair = [measure(name, args, gb) for name in VARIANTS]
        for r in pair:
            r["x_vs_dense"] = r["tokens_per_s"] / pair[0]["tokens_per_s"]
            print(
                f"{r['variant']:<8} {gb * SEQ:>7} tokens/step {r['tokens_per_s']:>10,.0f} tok/s  "
                f"x{r['x_vs_dense']:.2f} vs dense  {r['peak_gib']:.1f} GiB",
                flush=True,
            )
        rows += pair
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with open(os.path.join(args.out, "subllm_throughput.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
