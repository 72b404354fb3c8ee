"""Triton norms and RoPE on the GPU: bf16 correctness, bandwidth against eager and torch.compile
of the same reference in the same run, and a training step with kernels on and off.

Run on the device: python benchmarks/fused_ops_bench.py --out DIR
Bytes counted: forward reads x and writes y; backward reads x and dy and writes dx; weights once.
Times are medians of CUDA-graph replays (host launch gaps excluded) of the same work per impl.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

import fused_ops
from fused_ops.norms import layer_norm_ref, rms_norm_ref
from fused_ops.rope import apply_rope_ref


def ms(fn, grads=None):
    """Median GPU time of CUDA-graph replays: one op's launches would otherwise time the host."""
    return triton.testing.do_bench_cudagraph(fn, rep=200, grad_to_none=grads, return_mode="median")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def copy_bw():
    x = torch.randn(16384 * 4096 * 4, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    byts = 2 * x.numel() * 2
    plain = triton.testing.do_bench(lambda: y.copy_(x), warmup=100, rep=500, return_mode="median")
    return {"copy_TBps": byts / plain / 1e9, "copy_TBps_graph": byts / ms(lambda: y.copy_(x)) / 1e9}


def fwd_bwd(fn, grad):
    return lambda: fn().backward(grad)


def bench_norms(m=16384, n=4096):
    rows = []
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    el = m * n * 2
    cases = {
        "rms_norm": {
            "triton": lambda: fused_ops.rms_norm(x, w, 1e-5, backend="triton"),
            "eager": lambda: rms_norm_ref(x, w, 1e-5),
            "compile": torch.compile(lambda: rms_norm_ref(x, w, 1e-5)),
            "torch F.rms_norm": lambda: torch.nn.functional.rms_norm(x, (n,), w, 1e-5),
        },
        "layer_norm": {
            "triton": lambda: fused_ops.layer_norm(x, w, b, 1e-5, backend="triton"),
            "eager F.layer_norm": lambda: torch.nn.functional.layer_norm(x, (n,), w, b, 1e-5),
            "compile": torch.compile(lambda: layer_norm_ref(x, w, b, 1e-5)),
        },
        "rms_norm+residual": {
            "triton": lambda: fused_ops.rms_norm(x, w, 1e-5, residual=r, backend="triton")[0],
            "eager": lambda: rms_norm_ref(x + r, w, 1e-5),
            "compile": torch.compile(lambda: rms_norm_ref(x + r, w, 1e-5)),
        },
    }
    for op, impls in cases.items():
        # with a residual the kernel also reads it and writes x + residual; the eager / compiled
        # references are credited with the same bytes though they need not store the sum
        extra = el if "residual" in op else 0
        fwd_bytes = 2 * el + 2 * extra + n * 2
        bwd_bytes = 3 * el + 2 * n * 2
        for name, fn in impls.items():
            with torch.no_grad():
                tf = ms(fn)
            tfb = ms(fwd_bwd(fn, dy), grads=[x, w, b])
            rows.append(
                {
                    "op": op,
                    "impl": name,
                    "shape": [m, n],
                    "fwd_ms": tf,
                    "fwdbwd_ms": tfb,
                    "fwd_TBps": fwd_bytes / tf / 1e9,
                    "fwdbwd_TBps": (fwd_bytes + bwd_bytes) / tfb / 1e9,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_rope(b=4, s=8192, h=32, d=128):
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    pos = torch.arange(s, device="cuda")
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    el = q.numel() * 2
    fwd_bytes, fwdbwd_bytes = 4 * el, 8 * el
    rows = []

    def ref():
        return apply_rope_ref(q, k, pos, d)

    impls = {
        "triton": lambda: fused_ops.apply_rope(q, k, pos, d, backend="triton"),
        "eager": ref,
        "compile": torch.compile(ref),
    }
    for name, fn in impls.items():
        with torch.no_grad():
            tf = ms(fn)

        def run(fn=fn):
            qo, ko = fn()
            torch.autograd.backward((qo, ko), (gq, gk))

        tfb = ms(run, grads=[q, k])
        rows.append(
            {
                "op": "rope",
                "impl": name,
                "shape": [b, s, h, d],
                "fwd_ms": tf,
                "fwdbwd_ms": tfb,
                "fwd_TBps": fwd_bytes / tf / 1e9,
                "fwdbwd_TBps": fwdbwd_bytes / tfb / 1e9,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def correctness():
    out = []
    for kind, n in (("rms", 4096), ("layer", 4096), ("rms", 5120), ("layer", 1000), ("rms", 16384)):
        x, r, dy = (torch.randn(2048, n, device="cuda", dtype=torch.float64) for _ in range(3))
        w, bb = (
            torch.randn(n, device="cuda", dtype=torch.float64),
            torch.randn(n, device="cuda", dtype=torch.float64),
        )

        def run(dtype, backend):
            ts = [t.to(dtype).requires_grad_() for t in (x, r, w, bb)]
            if kind == "rms":
                y, s = fused_ops.rms_norm(ts[0], ts[2], 1e-5, residual=ts[1], backend=backend)
                ts = ts[:3]
            else:
                y, s = fused_ops.layer_norm(
                    ts[0], ts[2], ts[3], 1e-5, residual=ts[1], backend=backend
                )
            return [y, s, *torch.autograd.grad((y * dy.to(dtype)).sum(), ts)]

        truth = run(torch.float64, "reference")
        ker = run(torch.bfloat16, "triton")
        refb = run(torch.bfloat16, "reference")
        out.append(
            {
                "op": f"{kind}_norm+residual",
                "n": n,
                "triton_bf16_rel_err": [rel(a, t) for a, t in zip(ker, truth)],
                "reference_bf16_rel_err": [rel(a, t) for a, t in zip(refb, truth)],
            }
        )
    q, k = (
        torch.randn(2, 512, 8, 128, device="cuda", dtype=torch.float64),
        torch.randn(2, 512, 2, 128, device="cuda", dtype=torch.float64),
    )
    pos = torch.randint(0, 4096, (2, 512), device="cuda")
    for rot in (128, 32):

        def run(dtype, backend):
            a, c = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
            qo, ko = fused_ops.apply_rope(a, c, pos, rot, backend=backend)
            return [
                qo,
                ko,
                *torch.autograd.grad((qo.double().sum() + 2 * ko.double().sum()), (a, c)),
            ]

        truth, ker, refb = (
            run(torch.float64, "reference"),
            run(torch.bfloat16, "triton"),
            run(torch.bfloat16, "reference"),
        )
        out.append(
            {
                "op": f"rope rot={rot}",
                "triton_bf16_rel_err": [rel(a, t) for a, t in zip(ker, truth)],
                "reference_bf16_rel_err": [rel(a, t) for a, t in zip(refb, truth)],
            }
        )
    for o in out:
        o["pass"] = all(
            e <= 2 * re_ + 1e-3
            for e, re_ in zip(o["triton_bf16_rel_err"], o["reference_bf16_rel_err"])
        )
    return out


def train_step_losses():
    from megatron_sep.config import config_from_dict
    from megatron_sep.model import build_model

    res = {}
    for family in ("llama", "neox"):
        model = {
            "family": family,
            "num_layers": 4,
            "hidden_size": 512,
            "num_heads": 8,
            "vocab_size": 32000,
            "max_position_embeddings": 1024,
            "rotary_pct": 0.25 if family == "neox" else 1.0,
        }
        tokens = torch.randint(
            0, 32000, (4, 1025), device="cuda", generator=torch.Generator("cuda").manual_seed(1)
        )
        losses = {}
        for kernels in ("reference", "triton"):
            torch.manual_seed(0)
            m = build_model(
                config_from_dict(
                    {"model": {**model, "kernels": kernels}, "data": {"seq_len": 1024}}
                )
            ).cuda()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            seq = []
            for _ in range(3):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = m(tokens[:, :-1], tokens[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad()
                seq.append(loss.item())
            losses[kernels] = seq
        res[family] = losses
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    out = {
        "env": env,
        **copy_bw(),
        "correctness": correctness(),
        "train_steps": train_step_losses(),
    }
    print(json.dumps(out, indent=1), flush=True)
    out["norms"] = bench_norms()
    out["rope"] = bench_rope()
    with open(f"{args.out}/fused_ops.json", "w") as f:
        json.dump(out, f, indent=1)
    print(f"\ncopy {out['copy_TBps']:.2f} TB/s (graph-timed {out['copy_TBps_graph']:.2f})")
    for r in out["norms"] + out["rope"]:
        print(
            f"{r['op']:<18} {r['impl']:<18} fwd {r['fwd_ms']:.3f} ms {r['fwd_TBps']:.2f} TB/s | "
            f"fwd+bwd {r['fwdbwd_ms']:.3f} ms {r['fwdbwd_TBps']:.2f} TB/s"
        )


if __name__ == "__main__":
    main()
