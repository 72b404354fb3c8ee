"""Sweep the norms' launch shapes on the GPU: forward warps, backward programs per SM / warps / stages."""

import json

import torch
import triton

import fused_ops
from fused_ops import norms_triton


def main(m=16384, n=4096):
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    byts = (5 * m * n + 3 * n) * 2
    rows = []
    for kind in ("rms", "layer"):
        for warps in (4, 8, 16):
            norms_triton.FWD_WARPS[kind] = warps
            with torch.no_grad():
                fn = (
                    (lambda: fused_ops.rms_norm(x, w, 1e-5, backend="triton"))
                    if kind == "rms"
                    else (lambda: fused_ops.layer_norm(x, w, b, 1e-5, backend="triton"))
                )
                t = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            rows.append(
                {
                    "kind": kind,
                    "pass": "fwd",
                    "warps": warps,
                    "fwd_ms": t,
                    "TBps": (2 * m * n + n) * 2 / t / 1e9,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        norms_triton.FWD_WARPS[kind] = None
    for kind in ("rms", "layer"):
        for pps in (4, 8, 16, 32):
            for warps in (4, 8, 16):
                for stages in (1, 2):
                    norms_triton.BWD[kind] = norms_triton.NormBwdTiles(
                        progs_per_sm=pps, warps=warps, stages=stages
                    )

                    def run():
                        y = (
                            fused_ops.rms_norm(x, w, 1e-5, backend="triton")
                            if kind == "rms"
                            else fused_ops.layer_norm(x, w, b, 1e-5, backend="triton")
                        )
                        y.backward(dy)

                    try:
                        t = triton.testing.do_bench_cudagraph(
                            run, rep=100, grad_to_none=[x, w, b], return_mode="median"
                        )
                    except Exception as e:  # a shape the compiler rejects (e.g. too many registers)
                        print(kind, pps, warps, stages, "failed", type(e).__name__, flush=True)
                        continue
                    rows.append(
                        {
                            "kind": kind,
                            "pass": "fwd+bwd",
                            "progs_per_sm": pps,
                            "warps": warps,
                            "stages": stages,
                            "fwdbwd_ms": t,
                            "TBps": byts / t / 1e9,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    for kind in ("rms", "layer"):
        for p in ("fwd", "fwd+bwd"):
            best = max(
                (r for r in rows if r["kind"] == kind and r["pass"] == p), key=lambda r: r["TBps"]
            )
            print("best", json.dumps(best))


if __name__ == "__main__":
    main()
