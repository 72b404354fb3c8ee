"""SepAttention Triton kernel on the GPU: bf16 correctness against the fp32 reference, and forward /
forward+backward times against the fastest dense causal attention in the same run.

Run on the device: PYTHONPATH=. python3 benchmarks/sep_attention_kernel.py --out DIR [--tune] [--profile]
- Dense baselines: SDPA causal under each backend that runs (cuDNN, flash, efficient) and FlashAttention-4
  when `flash_attn.cute` imports; ratios are against the fastest of them, per timing mode.
- Two timings per row: CUDA-graph replays (`do_bench_cudagraph`: kernel time) and plain launches
  (`do_bench`: what eager code pays, host overhead included). Medians.
- Shapes from the issue: B=1, 16 heads, head dim 128, init 3, window 256, 10% and 20% separators at random
  positions, seq 4K / 16K / 64K. Kept pairs: the (query, key) pairs SepLLM computes; their share of the
  causal pairs gives the ideal (work-proportional) speedup, and TFLOP/s on kept pairs = 4 d pairs H / t
  (forward; x2.5 for forward+backward, the dense convention).
--tune sweeps each kernel's launch shape at 16K and 64K (10% separators) and uses the fastest for the
table (recorded under "tuned"; copy it into CONFIG in fused_ops/sep_attention_launch.py). --variants times
other launch shapes beside the default in the same run.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
import triton

import fused_ops
from fused_ops import sep_attention_launch as launch
from fused_ops import sep_attention_triton as kern
from fused_ops.sep_plan import build_plan, kept_keys

H, D, INIT = 16, 128, 3
DEV = "cuda"  # a CPU dry run of this script (TRITON_INTERPRET=1) sets "cpu" and small shapes


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def correctness():
    """bf16 kernel vs the fp32 reference: relative L2 error at most 2x the bf16 reference's + 2e-3."""
    rows = []
    for b, hq, hk, s, d, dens, n, docs in [
        (2, 8, 4, 1000, 64, 0.1, 7, 0),
        (1, 8, 8, 2047, 128, 0.3, 256, 0),
        (2, 4, 1, 777, 128, 1.0, 1, 0),
        (1, 16, 16, 4096, 128, 0.1, 64, 0),
        (2, 8, 2, 4096, 128, 0.2, 256, 5),
    ]:
        q, k, v = (torch.randn(b, h, s, d, device=DEV) for h in (hq, hk, hk))
        is_sep = (
            torch.rand(b, s, device=DEV) < dens * torch.linspace(0.5, 1, b, device=DEV)[:, None]
        )
        seg = None
        if docs:
            seg = torch.zeros(b, s, dtype=torch.long, device=DEV)
            seg[:, torch.randperm(s - 1)[:docs] + 1] = 1
            seg = seg.cumsum(1)
        go = torch.randn(b, hq, s, d, device=DEV)
        res = {}
        for name, dtype, backend in (
            ("ref32", torch.float32, "reference"),
            ("triton16", torch.bfloat16, "triton"),
            ("ref16", torch.bfloat16, "reference"),
        ):
            x = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
            o = fused_ops.sep_attention(
                *x, is_sep, init_tokens=3, window=n, backend=backend, segment_ids=seg
            )
            o.backward(go.to(dtype))
            res[name] = [o.detach()] + [t.grad for t in x]
        err = {
            k_: [rel(a, r) for a, r in zip(res[k_], res["ref32"])] for k_ in ("triton16", "ref16")
        }
        rows.append(
            {
                "shape": [b, hq, hk, s, d],
                "density": dens,
                "window": n,
                "documents": docs + 1 if docs else 0,
                "triton_bf16_rel_err[o,dq,dk,dv]": err["triton16"],
                "ref_bf16_rel_err": err["ref16"],
                "pass": all(e <= 2 * r + 2e-3 for e, r in zip(err["triton16"], err["ref16"])),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def time_both(fn, grads=None):
    """(CUDA-graph median ms or None where capture fails, plain-launch median ms)."""
    try:
        graph = triton.testing.do_bench_cudagraph(
            fn, rep=200, grad_to_none=grads, return_mode="median"
        )
    except Exception:  # capture can fail (host syncs); the plain time still stands
        graph = None
    plain = triton.testing.do_bench(
        fn, warmup=50, rep=300, grad_to_none=grads, return_mode="median"
    )
    return graph, plain


def load_fa4():
    """FlashAttention-4's function (CuTe DSL) when it imports here, else the reason it does not."""
    try:
        from flash_attn.cute.interface import flash_attn_func

        return flash_attn_func, None
    except Exception as e:  # not installed, or no build for this GPU / CUDA
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def dense_impls(s, wanted=None):
    """name -> (forward fn, leaves for grads) for dense causal attention at seq s (`wanted`: names to keep)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (
        torch.randn(1, H, s, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    impls = {}
    for name, be in (
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        if wanted and name not in wanted:
            continue

        def fn(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        try:
            fn().backward(torch.randn_like(q))
        except Exception as e:
            print(json.dumps({"seq": s, "skipped": name, "why": str(e)[:200]}), flush=True)
            continue
        impls[name] = (fn, [q, k, v])
    fa4, _ = load_fa4()
    if fa4 is not None and (not wanted or "fa4" in wanted):
        qt, kt, vt = (
            torch.randn(1, s, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )

        def fa(qt=qt, kt=kt, vt=vt):
            out = fa4(qt, kt, vt, causal=True)
            return out[0] if isinstance(out, tuple) else out

        try:
            fa().backward(torch.randn(1, s, H, D, device=DEV, dtype=torch.bfloat16))
            impls["fa4"] = (fa, [qt, kt, vt])
        except Exception as e:
            print(json.dumps({"seq": s, "skipped": "fa4", "why": str(e)[:300]}), flush=True)
    return impls


def kept_pairs(is_sep, window):
    """(query, key) pairs SepLLM attends to, and the causal count."""
    s = is_sep.shape[1]
    keep = kept_keys(is_sep, INIT)[0].long()
    older = torch.cumsum(keep, 0)  # kept keys at positions <= j
    i = torch.arange(s, device=is_sep.device)
    band = torch.clamp(i + 1, max=window)
    far = torch.where(i - window >= 0, older[(i - window).clamp(min=0)], torch.zeros_like(i))
    return int((band + far).sum()), s * (s + 1) // 2


def timed_pair(fn, leaves, go):
    with torch.no_grad():
        fwd = time_both(fn)
    fb = time_both(lambda: fn().backward(go), leaves)
    return {
        "fwd_graph_ms": fwd[0],
        "fwd_plain_ms": fwd[1],
        "fwdbwd_graph_ms": fb[0],
        "fwdbwd_plain_ms": fb[1],
    }


def speed(seqs, densities, window, variants=None, flex=False, dense_names=None):
    """Per seq: the dense baselines once, then SepLLM per separator density (and launch-shape variant)."""
    rows = []
    for s in seqs:
        dense = {}
        for name, (fn, leaves) in dense_impls(s, dense_names).items():
            go = torch.randn_like(leaves[0])
            dense[name] = timed_pair(fn, leaves, go)
            print(json.dumps({"seq": s, "dense": name, **dense[name]}), flush=True)
        best = {
            m: min(((d[m], n) for n, d in dense.items() if d[m] is not None), default=(None, None))
            for m in dense[next(iter(dense))]
        }
        q, k, v = (
            torch.randn(1, H, s, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        go = torch.randn_like(q)
        for dens in densities:
            is_sep = torch.rand(1, s, device=DEV) < dens
            pairs, causal = kept_pairs(is_sep, window)
            impls = {}
            for vname, over in {"triton": None, **(variants or {})}.items():
                over = dict(over or {})
                # {"deterministic": false}: atomic dQ for the list part
                det = over.pop("deterministic", True)
                plan = build_plan(is_sep, INIT, [window], "triton", tile_rows=kern.tile_rows(over))
                impls[vname if vname == "triton" else f"triton_{vname}"] = (
                    lambda over=over, plan=plan, det=det: kern.sep_attention_triton(
                        q, k, v, is_sep, INIT, window, config=over, plan=plan, deterministic=det
                    )
                )
            if flex:
                fplan = fused_ops.plan_for(is_sep, INIT, [window], "flex", head_dim=D)
                impls["flex"] = lambda fplan=fplan: fused_ops.sep_attention(
                    q, k, v, is_sep, init_tokens=INIT, window=window, backend="flex", plan=fplan
                )
            r = {
                "seq": s,
                "window": window,
                "separators": dens,
                "kept_pairs_share": pairs / causal,
                "ideal_x": causal / pairs,
                "dense": dense,
                "fastest_dense": {m: n for m, (_, n) in best.items()},
            }
            for name, fn in impls.items():
                t = timed_pair(fn, [q, k, v], go)
                r[name] = t
                for m, ms in list(t.items()):
                    if ms is not None and best[m][0] is not None:
                        r[name][m.replace("_ms", "_x_dense")] = best[m][0] / ms
                fwd_ms = t["fwd_graph_ms"] or t["fwd_plain_ms"]
                r[name]["fwd_tflops_kept"] = 4 * D * pairs * H / fwd_ms / 1e9
                fb_ms = t["fwdbwd_graph_ms"] or t["fwdbwd_plain_ms"]
                r[name]["fwdbwd_tflops_kept"] = 2.5 * 4 * D * pairs * H / fb_ms / 1e9
            r["fastest_dense_fwd_tflops"] = (
                4 * D * causal * H / (best["fwd_graph_ms"][0] or best["fwd_plain_ms"][0]) / 1e9
            )
            r["fwd_tflops_kept_share_of_dense"] = (
                r["triton"]["fwd_tflops_kept"] / r["fastest_dense_fwd_tflops"]
            )
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


CANDIDATES = {  # (BM, BN, warps, stages, TMA, HEADS_FIRST, WS); BM is the query tile, BN the key tile
    "fwd": [
        (64, 64, 4, 3, 0, 0, 0),
        (128, 64, 8, 3, 0, 0, 0),
        (128, 128, 8, 2, 0, 0, 0),
        (64, 64, 4, 3, 1, 0, 0),
        (128, 64, 8, 3, 1, 0, 0),
        (128, 128, 8, 2, 1, 0, 0),
        (128, 128, 8, 3, 1, 0, 0),
        (64, 128, 4, 3, 1, 0, 0),
        (128, 64, 4, 3, 1, 0, 0),
        (128, 64, 8, 3, 1, 0, 1),
        (128, 128, 8, 2, 1, 0, 1),
    ],
    "dq": [
        (128, 64, 8, 3, 0, 0, 0),
        (128, 64, 8, 3, 1, 0, 0),
        (128, 128, 8, 2, 1, 0, 0),
        (64, 64, 4, 3, 1, 0, 0),
        (128, 32, 8, 3, 1, 0, 0),
        (64, 128, 4, 2, 1, 0, 0),
        (128, 64, 4, 3, 1, 0, 0),
    ],
    "dkdv": [
        (32, 64, 4, 3),
        (32, 128, 8, 3),
        (64, 128, 8, 2),
        (64, 128, 8, 3),
        (32, 128, 4, 3),
        (16, 64, 4, 3),
        (64, 64, 4, 3),
        (32, 64, 4, 4),
        (16, 128, 8, 3),
    ],
}


def tune(seqs=(16384, 65536), window=256):
    """Each kernel's candidates with the others at their current best (fwd timed alone, dq/dkdv in fwd+bwd),
    then the grid order on the winner of fwd and dq. The choice minimises the product of the CUDA-graph
    times over `seqs` (one shape for all lengths)."""
    inputs = []
    for s in seqs:
        q, k, v = (
            torch.randn(1, H, s, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        inputs.append((q, k, v, torch.rand(1, s, device=DEV) < 0.10, torch.randn_like(q)))
    log = []

    def trial(name, shape):
        # the table sep_attention_triton reads
        launch.CONFIG = launch.CONFIG._replace(**{name: shape})
        times = []
        try:
            for q, k, v, is_sep, go in inputs:
                plan = build_plan(is_sep, INIT, [window], "triton", tile_rows=kern.tile_rows())

                def fn(q=q, k=k, v=v, is_sep=is_sep, plan=plan):
                    return kern.sep_attention_triton(q, k, v, is_sep, INIT, window, plan=plan)

                if name == "fwd":
                    with torch.no_grad():
                        times.append(
                            triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
                        )
                else:
                    times.append(
                        triton.testing.do_bench_cudagraph(
                            lambda fn=fn, go=go: fn().backward(go),
                            rep=100,
                            grad_to_none=[q, k, v],
                            return_mode="median",
                        )
                    )
        # e.g. out of shared memory, or a feature this Triton lacks on this GPU
        except Exception as e:
            log.append({"kernel": name, "config": shape._asdict(), "error": repr(e)[:300]})
            print(json.dumps(log[-1]), flush=True)
            return None
        log.append({"kernel": name, "config": shape._asdict(), "ms": dict(zip(seqs, times))})
        print(json.dumps(log[-1]), flush=True)
        return math.prod(times)

    for name, cands in CANDIDATES.items():
        record = launch.KeyTiles if name == "dkdv" else launch.QueryTiles
        best = None
        for c in cands:
            shape = record(*c)
            score = trial(name, shape)
            if score is not None and (best is None or score < best[0]):
                best = (score, shape)
        if name != "dkdv":
            flipped = best[1]._replace(HEADS_FIRST=1 - best[1].HEADS_FIRST)
            score = trial(name, flipped)
            if score is not None and score < best[0]:
                best = (score, flipped)
        launch.CONFIG = launch.CONFIG._replace(**{name: best[1]})
    return {"sweep": log, "chosen": launch.CONFIG.as_dict()}


def kernel_breakdown(seqs, window=256, density=0.1):
    """CUDA time per kernel name in one forward+backward of the Triton backend (torch profiler)."""
    out = {}
    for s in seqs:
        q, k, v = (
            torch.randn(1, H, s, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        is_sep = torch.rand(1, s, device=DEV) < density
        go = torch.randn_like(q)
        plan = build_plan(is_sep, INIT, [window], "triton", tile_rows=kern.tile_rows())
        for _ in range(3):
            kern.sep_attention_triton(q, k, v, is_sep, INIT, window, plan=plan).backward(go)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                q.grad = k.grad = v.grad = None  # else the grad accumulation shows up as a kernel
                kern.sep_attention_triton(q, k, v, is_sep, INIT, window, plan=plan).backward(go)
            torch.cuda.synchronize()
        ms = {}
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                ms[e.key[:60]] = ms.get(e.key[:60], 0) + e.device_time_total / 5e3
        out[s] = dict(sorted(ms.items(), key=lambda kv: -kv[1]))
        print(json.dumps({"seq": s, "ms_per_kernel": out[s]}), flush=True)
    return out


def plan_ms(seqs, window=256):
    """Building the plan (sort of kept keys, per-tile bounds) once per micro-batch, shared by the layers."""
    out = {}
    for s in seqs:
        is_sep = torch.rand(1, s, device=DEV) < 0.10
        out[s] = triton.testing.do_bench(
            lambda: build_plan(is_sep, INIT, [window], "triton", tile_rows=kern.tile_rows()),
            warmup=20,
            rep=100,
            return_mode="median",
        )
    return out


def table(rows, name="triton"):
    """Markdown rows: seq, separators, kept share (ideal), fwd+bwd x dense (graph / plain), fwd x dense (graph),
    TFLOP/s on kept pairs and its share of the dense forward's."""
    lines = [
        "| seq | separators | kept pairs (ideal) | fwd+bwd x dense, graphs | fwd+bwd x dense, plain | "
        "fwd x dense, graphs | fwd TFLOP/s on kept pairs (share of dense) | fastest dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r[name]
        lines.append(
            f"| {r['seq']} | {r['separators']:.0%} | {r['kept_pairs_share']:.1%} ({r['ideal_x']:.1f}x) | "
            f"{t.get('fwdbwd_graph_x_dense', float('nan')):.2f}x | {t['fwdbwd_plain_x_dense']:.2f}x | "
            f"{t.get('fwd_graph_x_dense', float('nan')):.2f}x | {t['fwd_tflops_kept']:.0f} "
            f"({t['fwd_tflops_kept'] / r['fastest_dense_fwd_tflops']:.0%}) | "
            f"{r['fastest_dense']['fwdbwd_graph_ms']} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--seqs", default="4096,16384,65536")
    ap.add_argument("--densities", default="0.1,0.2")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness cases")
    ap.add_argument("--flex", action="store_true", help="also time the flex backend")
    ap.add_argument(
        "--variants",
        default="{}",
        help='JSON: name -> config overrides, e.g. {"v3": {"fwd": '
        '{"BM": 64}}}, timed beside the default kernel',
    )
    ap.add_argument("--profile", action="store_true", help="also record the CUDA time per kernel")
    ap.add_argument(
        "--dense",
        default="",
        help="comma list of dense baselines to time (default: all of "
        "sdpa_cudnn, sdpa_flash, sdpa_efficient, fa4)",
    )
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    fa4, fa4_why = load_fa4()
    out = {
        "env": {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "fa4": "imported" if fa4 else fa4_why,
        }
    }
    out["correctness"] = [] if args.no_check else correctness()
    seqs = [int(x) for x in args.seqs.split(",")]

    def save():  # after each part, so a run cut off by a time limit keeps what it measured
        with open(f"{args.out}/sep_attention_kernel.json", "w") as f:
            json.dump(out, f, indent=1)

    if args.tune:
        out["tuned"] = tune()
        print(json.dumps(out["tuned"]["chosen"]), flush=True)
        save()
    out["config"] = launch.CONFIG.as_dict()
    out["triton_plan_ms"] = plan_ms(seqs, args.window)
    if args.profile:
        out["ms_per_kernel"] = kernel_breakdown(seqs, args.window)
        save()
    out["rows"] = speed(
        seqs,
        [float(x) for x in args.densities.split(",")],
        args.window,
        json.loads(args.variants),
        args.flex,
        [x for x in args.dense.split(",") if x],
    )
    save()
    print(table(out["rows"]))
    for v in json.loads(args.variants):
        print(f"\nvariant {v}\n" + table(out["rows"], f"triton_{v}"))


if __name__ == "__main__":
    main()
