"""What checkpoint.async_save saves per step (issue 35): the Trainer on the Llama 1.3B shape (bf16 autocast,
compiled, synthetic tokens), a save every K steps, once with synchronous saves and once with async ones.
Reports the time each non-final save blocks the training loop, the step time while a background write is
in flight, and the wall time of the whole run; a second run of each mode checks that the numbers repeat.

  PYTHONPATH=. python3 benchmarks/async_checkpoint.py --out DIR [--steps 24] [--every 6] [--shape cpu-small]

--shape cpu-small (a 58M-parameter Llama, fp32, eager) checks the mechanism on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from megatron_sep.config import config_from_dict
from megatron_sep.training import Trainer

from train_throughput import PRESETS  # benchmarks/ is on sys.path when this file runs as a script


SHAPES = {
    "cpu-small": {
        "model": {
            "family": "llama",
            "num_layers": 8,
            "hidden_size": 512,
            "num_heads": 8,
            "vocab_size": 32000,
            "max_position_embeddings": 512,
        },
        "seq": 512,
        "mbs": 2,
    }
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimedTrainer(Trainer):
    """Records how long each save blocks the loop, and each step's time (synchronised)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.saves, self.steps = [], []

    def save(self, final: bool = False) -> None:
        sync()
        t0 = time.perf_counter()
        super().save(final)
        sync()
        self.saves.append({"step": self.step, "final": final, "s": time.perf_counter() - t0})

    def train_step(self):
        t0 = time.perf_counter()
        out = super().train_step()
        sync()
        in_flight = self.pending is not None and not self.pending.done()
        self.steps.append(
            {"step": self.step, "s": time.perf_counter() - t0, "write_in_flight": in_flight}
        )
        return out


def run(mode: str, out: Path, steps: int, every: int, shape: str, eager: bool = False) -> dict:
    p = SHAPES.get(shape) or PRESETS[shape]
    gpu = torch.cuda.is_available()
    run_dir = out / f"run_{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = config_from_dict(
        {
            "model": p["model"],
            "attention": {"kind": "dense"},
            "data": {"seq_len": p["seq"], "mock": True},
            "optim": {"lr": 3e-4, "warmup_steps": 2},
            "train": {
                "run_dir": str(run_dir),
                "micro_batch_size": p["mbs"],
                "steps": steps,
                "compile": gpu and not eager,
                "eval_interval": 10**6,
                "eval_iters": 1,
            },
            "checkpoint": {
                "save_interval": every,
                "keep_last": 1,
                "async_save": mode.startswith("async"),
            },
            "logging": {"log_interval": 10**6},
        }
    )
    tr = TimedTrainer(cfg)
    t0 = time.perf_counter()
    tr.run()
    wall = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file())
    # the disk holds two or three 1.3B checkpoints at most
    shutil.rmtree(run_dir, ignore_errors=True)
    warm = [s for s in tr.steps if s["step"] > 3]  # compile and warm-up first
    plain = [s["s"] for s in warm if not s["write_in_flight"]]
    busy = [s["s"] for s in warm if s["write_in_flight"]]
    mid = [s["s"] for s in tr.saves if not s["final"]]
    return {
        "mode": mode,
        "wall_s": wall,
        "checkpoint_gb": size / 1e9,
        "save_block_s": mid,
        "final_save_s": [s["s"] for s in tr.saves if s["final"]],
        "step_s_median": sorted(plain)[len(plain) // 2] if plain else None,
        "step_s_write_in_flight_median": sorted(busy)[len(busy) // 2] if busy else None,
        "steps_with_write_in_flight": len(busy),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--shape", default="llama1.3b", help="llama1.3b (GPU) or cpu-small")
    ap.add_argument(
        "--eager", action="store_true", help="no torch.compile (saves its minute per run)"
    )
    ap.add_argument(
        "--modes", default="sync,async,sync_2,async_2", help="runs in order (_2: a repeat)"
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.modes.split(","):
        rows.append(run(mode, out, args.steps, args.every, args.shape, args.eager))
        print(json.dumps(rows[-1]), flush=True)
        # written after every run: a call cut off at its time limit keeps the runs it finished
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        (out / f"async_checkpoint_{args.shape}.json").write_text(
            json.dumps(
                {
                    "device": device,
                    "shape": args.shape,
                    "steps": args.steps,
                    "every": args.every,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
