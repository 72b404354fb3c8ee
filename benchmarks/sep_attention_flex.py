"""SepLLM attention on the GPU: flex vs reference correctness (bf16), speed vs SDPA causal,
and the first-step loss of a tiny SepLLM model (GPU flex vs CPU reference).

Run on the device: python benchmarks/sep_attention_flex.py --out DIR
Writes DIR/sep_attention_flex.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import fused_ops
from megatron_sep.config import config_from_dict
from megatron_sep.model import build_model


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def correctness():
    rows = []
    for b, hq, hk, s, d, dens, win, a, segs in [
        (2, 8, 4, 1000, 64, 0.1, 7, 3, False),
        (2, 8, 8, 777, 128, 0.3, 64, 0, False),
        (3, 4, 2, 1500, 64, 0.05, 256, 3, True),
        (1, 4, 1, 600, 128, 1.0, 1, 3, False),
    ]:
        q, k, v = (torch.randn(b, h, s, d, device="cuda") for h in (hq, hk, hk))
        is_sep = (
            torch.rand(b, s, device="cuda")
            < dens * torch.linspace(0.5, 1, b, device="cuda")[:, None]
        )
        seg = torch.cumsum((torch.rand(b, s, device="cuda") < 0.01).long(), 1) if segs else None
        go = torch.randn(b, hq, s, d, device="cuda")
        res = {}
        for name, dtype, backend in (
            ("ref32", torch.float32, "reference"),
            ("flex16", torch.bfloat16, "flex"),
            ("ref16", torch.bfloat16, "reference"),
        ):
            x = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
            o = fused_ops.sep_attention(
                *x, is_sep, init_tokens=a, window=win, backend=backend, segment_ids=seg
            )
            o.backward(go.to(dtype))
            res[name] = [o.detach()] + [t.grad for t in x]
        err = {n: [rel(t, r) for t, r in zip(res[n], res["ref32"])] for n in ("flex16", "ref16")}
        rows.append(
            {
                "shape": [b, hq, hk, s, d],
                "density": dens,
                "window": win,
                "init": a,
                "segments": segs,
                "flex_bf16_rel_err[o,dq,dk,dv]": err["flex16"],
                "ref_bf16_rel_err[o,dq,dk,dv]": err["ref16"],
                "pass": all(e < 2e-2 for e in err["flex16"]),
            }
        )
    return rows


def bench(ms_fn):
    return triton.testing.do_bench(ms_fn, warmup=50, rep=300, return_mode="median")


def speed(seqs, window):
    rows = []
    for s in seqs:
        h, d = 16, 128
        q, k, v = (
            torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        is_sep = torch.rand(1, s, device="cuda") < 0.10
        go = torch.randn_like(q)
        keep = fused_ops.kept_keys(is_sep, 3)
        pref = torch.cumsum(keep[0].long(), 0)
        i = torch.arange(s, device="cuda")
        per_q = torch.minimum(i + 1, torch.tensor(window, device="cuda")) + torch.where(
            i >= window, pref[(i - window).clamp(min=0)], 0
        )
        kept = (per_q.double().sum() / (s * (s + 1) / 2)).item()

        def fb(fn):
            def run():
                q.grad = k.grad = v.grad = None
                fn().backward(go)

            return run

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        # per micro-batch, shared by the layers
        fplan = fused_ops.plan_for(is_sep, 3, [window], "flex")

        def two():
            return fused_ops.sep_attention(
                q, k, v, is_sep, init_tokens=3, window=window, backend="flex", plan=fplan
            )

        ks = keep[0]

        def masked_mod(b_, h_, qi, kv):
            return (kv <= qi) & (ks[kv] | (qi - kv < window))

        bm = create_block_mask(
            masked_mod, B=None, H=None, Q_LEN=s, KV_LEN=s, device="cuda", _compile=True
        )
        flex_c = torch.compile(flex_attention, dynamic=False)

        def masked():
            return flex_c(q, k, v, block_mask=bm)

        r = {"seq": s, "window": window, "kept_pairs_share": kept}

        def plan():  # per microbatch, shared by all layers with this window
            fused_ops.plan_for(is_sep, 3, [window], "flex")

        r["flex_two_part_plan_ms"] = bench(plan)
        for name, fn in (("sdpa_causal", sdpa), ("flex_two_part", two), ("flex_masked", masked)):
            with torch.no_grad():
                r[f"{name}_fwd_ms"] = bench(fn)
            r[f"{name}_fwdbwd_ms"] = bench(fb(fn))
        for name in ("flex_two_part", "flex_masked"):
            r[f"{name}_speedup_fwdbwd_vs_sdpa"] = (
                r["sdpa_causal_fwdbwd_ms"] / r[f"{name}_fwdbwd_ms"]
            )
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def first_step_loss():
    cfg = config_from_dict(
        {
            "model": {
                "family": "llama",
                "num_layers": 2,
                "hidden_size": 64,
                "num_heads": 4,
                "num_kv_heads": 2,
                "vocab_size": 100,
                "max_position_embeddings": 512,
            },
            "attention": {"kind": "sepllm", "separators": [1, 2, 3], "window": 16},
            "data": {"seq_len": 300},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, 100, (2, 301))
    cpu = model(tokens[:, :-1], tokens[:, 1:]).item()
    cfg.attention.backend = "flex"
    gpu = model.cuda()(tokens[:, :-1].cuda(), tokens[:, 1:].cuda()).item()
    return {"cpu_reference_fp32": cpu, "gpu_flex_fp32": gpu, "abs_diff": abs(cpu - gpu)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--seqs", default="4096,16384,65536")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.recompile_limit = 64  # one compile per shape and grad mode here
    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    out = {"env": env, "first_step_loss": first_step_loss(), "correctness": correctness()}
    print(json.dumps(out, indent=1), flush=True)
    seqs = [int(x) for x in args.seqs.split(",")]
    out["speed_window256"] = speed(seqs, 256)
    out["speed_window64"] = speed(seqs, 64)
    with open(f"{args.out}/sep_attention_flex.json", "w") as f:
        json.dump(out, f, indent=1)
    print("\nseq  window  kept  sdpa fwd+bwd ms  two-part ms (x)  masked ms (x)  plan ms")
    for r in out["speed_window256"] + out["speed_window64"]:
        print(
            f"{r['seq']:>6} {r['window']:>4} {r['kept_pairs_share']:6.1%} {r['sdpa_causal_fwdbwd_ms']:9.2f} "
            f"{r['flex_two_part_fwdbwd_ms']:9.2f} ({r['flex_two_part_speedup_fwdbwd_vs_sdpa']:.2f}x) "
            f"{r['flex_masked_fwdbwd_ms']:9.2f} ({r['flex_masked_speedup_fwdbwd_vs_sdpa']:.2f}x) "
            f"{r['flex_two_part_plan_ms']:7.2f}"
        )


if __name__ == "__main__":
    main()
