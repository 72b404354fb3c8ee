"""Registers, spills and shared memory of the SepAttention kernels as compiled for this GPU (issue 38: why
dK/dV runs below dQ). Runs one forward and backward at the benchmark's shape, then reads what Triton
compiled for each kernel (`n_regs` per thread, `n_spills`, shared bytes, warps).

  PYTHONPATH=. python3 benchmarks/kernel_registers.py [--seq 65536] [--out DIR [--force]]
"""

from __future__ import annotations

import argparse
import json

import torch

import fused_ops
from fused_ops import sep_attention_kernels as kernels
from megatron_sep.outdir import script_out


def compiled(fn) -> list[dict]:
    """Every variant of a @triton.jit function compiled in this process."""
    rows = []
    for cache in getattr(fn, "device_caches", {}).values():
        table = cache[0] if isinstance(cache, tuple) else cache
        for k in table.values():
            md = k.metadata
            rows.append(
                {
                    "kernel": fn.__name__,
                    "n_regs": k.n_regs,
                    "n_spills": k.n_spills,
                    "shared_bytes": getattr(md, "shared", None),
                    "num_warps": getattr(md, "num_warps", None),
                    "num_stages": getattr(md, "num_stages", None),
                }
            )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--force", action="store_true", help="replace kernel_registers.json in a non-empty --out"
    )
    args = ap.parse_args()
    if args.out:
        script_out(args.out, args.force, "kernel_registers.json")
    torch.manual_seed(0)
    s, h, d = args.seq, 16, 128
    q, k, v = (
        torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    is_sep = torch.rand(1, s, device="cuda") < 0.1
    o = fused_ops.sep_attention(q, k, v, is_sep, init_tokens=3, window=256, backend="triton")
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    rows = [
        r
        for fn in (kernels.fwd_kernel, kernels.dq_kernel, kernels.dkdv_kernel)
        for r in compiled(fn)
    ]
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        with open(f"{args.out}/kernel_registers.json", "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "seq": s, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
