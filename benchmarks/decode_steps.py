"""Time per decode step, eager against CUDA graphs, for the speculative-decoding pair (random weights: the time
of a step does not depend on them). Batch 1, bf16, after a 64-token prompt:

  PYTHONPATH=. python3 benchmarks/decode_steps.py [--target configs/llama350m_text.yaml]
      [--draft configs/draft4_text.yaml] [--vocab 8192] [--k 4] [--out DIR [--force]]

For each model and decode path (full: the growing SepKVCache; static: the preallocated cache; graphs: the
static cache replayed as CUDA graphs) it times one-token steps and, for the target, the check of k + 1
tokens a speculative round runs (fed, then rolled back); then a whole greedy round under graphs, with the host
loop and as device rounds (the prompt's time included, over 128 new tokens). Prints ms per step;
DIR/decode_steps.json. --kernels: the target's GPU time per kernel instead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from megatron_sep.config import load_config
from megatron_sep.outdir import script_out
from megatron_sep.inference import DecodeOptions
from megatron_sep.inference.generate import feed, make_cache
from megatron_sep.inference.speculative import speculative_generate
from megatron_sep.model import build_model


def random_model(path: str, vocab: int):
    return (
        build_model(load_config(path, [f"model.vocab_size={vocab}"]))
        .to("cuda", torch.bfloat16)
        .eval()
    )


def stepper(model, path: str, s: int, steps: int):
    """A decode step of s tokens after a 64-token prompt, warmed up; it keeps one token and takes the rest back."""
    prompt = torch.randint(0, model.vocab_size, (1, 64), device="cuda")
    kv = make_cache(
        model,
        "full" if path == "full" else "static",
        capacity=64 + 2 * steps * s + 16,
        cuda_graphs=path == "graphs",
    )
    feed(model, kv, prompt)
    tokens = torch.randint(0, model.vocab_size, (1, s), device="cuda")

    def one():
        kv.mark()
        out = feed(model, kv, tokens)
        kv.rollback(kv.length - s + 1)
        return out

    for _ in range(3):
        one()
    torch.cuda.synchronize()
    return one


def step_ms(model, path: str, s: int, steps: int = 64) -> float:
    one = stepper(model, path, s, steps)
    t = time.perf_counter()
    for _ in range(steps):
        one()[0, -1].argmax().item()  # a decode step ends in a host sync (the next token)
    return (time.perf_counter() - t) / steps * 1e3


def round_ms(models, k: int, device_rounds: bool, new: int = 128) -> float:
    target, draft = models
    prompt = torch.randint(0, target.vocab_size, (1, 64), device="cuda")
    opts = DecodeOptions(draft_tokens=k, cuda_graphs=True, device_rounds=device_rounds)
    for _ in range(2):  # captures
        speculative_generate(target, draft, prompt, new, opts)
    _, stats = speculative_generate(target, draft, prompt, new, opts)
    return stats.seconds / stats.rounds * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--target", default="configs/llama350m_text.yaml")
    ap.add_argument("--draft", default="configs/draft4_text.yaml")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out")
    ap.add_argument(
        "--force", action="store_true", help="replace decode_steps.json in a non-empty --out"
    )
    ap.add_argument(
        "--profile", action="store_true", help="only cProfile eager one-token steps of the target"
    )
    ap.add_argument(
        "--kernels",
        action="store_true",
        help="only the target's GPU time per kernel, one token against a check of k + 1",
    )
    args = ap.parse_args()
    if args.profile:
        return profile(args)
    if args.kernels:
        return kernels(args)
    if args.out:  # before any timing: never over a file this script did not write
        script_out(args.out, args.force, "decode_steps.json")
    rows, models = {}, []
    for name, path in (("target", args.target), ("draft", args.draft)):
        model = random_model(path, args.vocab)
        models.append(model)
        with torch.no_grad():
            for mode in ("full", "static", "graphs"):
                for s in (1, args.k + 1) if name == "target" else (1,):
                    rows[f"{name} {mode} {s} token{'s' if s > 1 else ''}"] = ms = step_ms(
                        model, mode, s
                    )
                    print(f"{name:<7} {mode:<7} {s} token(s) per step: {ms:7.2f} ms", flush=True)
    # a whole greedy round under graphs (random models: each keeps ~1 token)
    for where in ("host", "device"):
        rows[f"round graphs, {where} loop"] = ms = round_ms(models, args.k, where == "device")
        print(f"a k={args.k} round under graphs, {where} loop: {ms:6.2f} ms", flush=True)
    for mode in ("full", "static", "graphs"):
        t1, tk, d1 = (
            rows[f"target {mode} 1 token"],
            rows[f"target {mode} {args.k + 1} tokens"],
            rows[f"draft {mode} 1 token"],
        )
        print(
            f"{mode:<7} a round at k={args.k} costs {tk + args.k * d1:6.2f} ms = "
            f"{(tk + args.k * d1) / t1:4.2f} target steps (draft step / target step {d1 / t1:.3f})"
        )
    if args.out:
        env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "k": args.k}
        Path(args.out, "decode_steps.json").write_text(
            json.dumps({"env": env, "ms_per_step": rows}, indent=1)
        )


def profile(args) -> None:
    import cProfile
    import pstats

    model = random_model(args.target, args.vocab)
    with torch.no_grad():
        for path in ("full", "static"):
            step_ms(model, path, 1, steps=8)
            prof = cProfile.Profile()
            prof.enable()
            print(f"{path}: {step_ms(model, path, 1, steps=16):.2f} ms per step under cProfile")
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def kernels(args) -> None:
    """GPU time per kernel name in a static-cache step (graphs replay the same kernels, without the gaps)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    model = random_model(args.target, args.vocab)
    with torch.no_grad():
        for s in (1, args.k + 1):
            one = stepper(model, "static", s, 8)
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(8):
                    one()
                torch.cuda.synchronize()
            rows = sorted(
                (
                    (e.key, e.device_time_total / 8e3, e.count / 8)
                    for e in prof.key_averages()
                    if e.device_time_total > 0
                ),
                key=lambda r: -r[1],
            )
            total = sum(r[1] for r in rows)
            print(f"target, {s} token(s) per step: {total:.3f} ms of GPU time in kernels per step")
            for key, ms, n in rows[:18]:
                print(f"  {ms:7.3f} ms  {n:5.0f}x  {key[:110]}")


if __name__ == "__main__":
    main()
