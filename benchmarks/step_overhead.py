"""Where the Trainer's step spends time beyond its GPU work (issue 18): the parts of Trainer.train_step timed
one by one on the 1.3B shape, compiled, so each part's cost is the difference between two rows.

  PYTHONPATH=. python3 benchmarks/step_overhead.py --out DIR [--precision bf16|fp8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from megatron_sep.config import config_from_dict
from megatron_sep.training import Trainer

from train_throughput import PRESETS  # benchmarks/ is on sys.path when this file runs as a script


def timed(fn, n: int = 8, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args()
    p = PRESETS["llama1.3b"]
    cfg = config_from_dict(
        {
            "model": p["model"],
            "attention": {"kind": "dense"},
            "data": {"seq_len": p["seq"], "mock": True},
            "train": {
                "run_dir": f"{args.out}/overhead_run",
                "micro_batch_size": p["mbs"],
                "steps": 10_000,
                "compile": True,
                "precision": args.precision,
            },
            "optim": {"warmup_steps": 2},
        }
    )
    torch.manual_seed(0)
    tr = Trainer(cfg, log=False)
    engine, opt = tr.engine, tr.engine.opt
    params = [q for q in tr.model.parameters()]
    batches = [tr.micro_batch(tr.train_ds, 0, p["mbs"])]

    def fwd_bwd():
        with tr.autocast:
            engine.forward_backward(batches)

    def fwd_bwd_zero():
        fwd_bwd()
        opt.zero_grad(set_to_none=True)

    def fwd_bwd_adamw():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fwd_bwd_clip_on_gpu():  # clipping without reading the norm on the host
        fwd_bwd()
        grads = [q.grad for q in params]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        torch._foreach_mul_(grads, (cfg.optim.clip_grad / (norm + 1e-6)).clamp(max=1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fwd_bwd_plan_step():
        fwd_bwd()
        engine.step()

    rows = {
        "train_step": timed(lambda: tr.train_step()),
        "fwd_bwd": timed(fwd_bwd_zero),
        "fwd_bwd_adamw": timed(fwd_bwd_adamw),
        "fwd_bwd_clip_on_gpu_adamw": timed(fwd_bwd_clip_on_gpu),
        "fwd_bwd_plan_step": timed(fwd_bwd_plan_step),
        "micro_batch_host": timed(lambda: tr.micro_batch(tr.train_ds, 0, p["mbs"]), n=20),
    }
    rows = {k: round(v, 2) for k, v in rows.items()}
    print(json.dumps(rows))
    with open(f"{args.out}/step_overhead_{args.precision}.json", "w") as f:
        json.dump(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ms": rows},
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
