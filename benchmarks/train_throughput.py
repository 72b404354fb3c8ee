"""Training throughput on one GPU: this framework against a plain PyTorch model of the same shape,
measured in the same run. Also the SepLLM training step with each attention backend.

Run on the device:
  PYTHONPATH=. python3 benchmarks/train_throughput.py --preset llama1.3b --out DIR
  PYTHONPATH=. python3 benchmarks/train_throughput.py --preset sepllm350m-16k --out DIR
Synthetic tokens (data loading is not what is measured). MFU uses 989 TFLOP/s (H100 / H200 dense bf16;
1979 fp8 for %fp8 rows, with the bf16-peak figure kept as mfu_bf16_peak) and the PaLM convention:
6 x matmul params + 12 x layers x hidden x seq FLOPs per token. --memory writes the live allocations at
a step's memory peak (memory_peak.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_sep.config import config_from_dict
from megatron_sep.model import build_model

from memory_model import LLAMA1B3  # benchmarks/ is on sys.path when this file runs as a script
from memory_peak import memory_at_peak

# kinds: [trainer/]KIND[-nWINDOW][:BACKEND][+ac][~unfused][%fp8][@KERNELS][&ENGINE][^pN]; trainer/ times the Trainer's own
# step (plan, autocast, clipping, schedule, optimizer); +ac turns on train.activation_checkpointing=full;
# ~unfused sets model.fused_loss=false (the LM head's full logits, then cross-entropy); %fp8 sets
# train.precision=fp8 (MFU then against the fp8 peak); &fsdp2 sets parallel.engine=fsdp2 (trainer/ kinds);
# ^p0 sets data.prefetch=0 (the step reads its own batches; default 1)
LLAMA350M = {
    "family": "llama",
    "num_layers": 24,
    "hidden_size": 1024,
    "num_heads": 16,
    "ffn_hidden_size": 2816,
    "vocab_size": 32000,
}
LLAMA1P3B = {**LLAMA1B3, "max_position_embeddings": 4096}
PRESETS = {
    "llama1.3b": {
        "model": LLAMA1P3B,
        "seq": 4096,
        "mbs": 2,
        "kinds": [
            "dense@reference",
            "dense",
            "trainer/dense",
            "trainer/dense~unfused",
            "trainer/dense%fp8",
            "trainer/dense%fp8@reference",
        ],
        "plain": True,
        "compile_only": ["dense@reference"],
    },
    # issue 39: the FSDP2 engine on one GPU against native, same shape and call (tokens/s, peak memory)
    "llama1.3b-engines": {
        "model": LLAMA1P3B,
        "seq": 4096,
        "mbs": 2,
        "kinds": [
            "trainer/dense",
            "trainer/dense&fsdp2",
            "trainer/dense%fp8",
            "trainer/dense%fp8&fsdp2",
        ],
        "plain": False,
        "compile_only": [
            "trainer/dense",
            "trainer/dense&fsdp2",
            "trainer/dense%fp8",
            "trainer/dense%fp8&fsdp2",
        ],
    },
    "sepllm350m-16k": {
        "model": {**LLAMA350M, "max_position_embeddings": 16384},
        "seq": 16384,
        "mbs": 1,
        "kinds": ["sepllm:triton", "sepllm:flex", "dense"],
        "plain": False,
    },
    # issue 15: the Trainer's step against dense attention compiled, same run
    "pythia160m-2k": {
        "model": {
            "family": "neox",
            "num_layers": 12,
            "hidden_size": 768,
            "num_heads": 12,
            "ffn_hidden_size": 3072,
            "vocab_size": 50304,
            "max_position_embeddings": 2048,
            "rotary_pct": 0.25,
        },
        "seq": 2048,
        "mbs": 16,
        "plain": False,
        "baseline": "trainer/dense:compile",
        "kinds": [
            "trainer/dense",
            "trainer/sepllm-n64",
            "trainer/sepllm-n128",
            "trainer/streamingllm-n64",
            "trainer/sepllm-n128^p0",  # issue 39: the same step reading its own batches (no prefetch)
        ],
    },
    "llama350m-16k": {
        "model": {**LLAMA350M, "max_position_embeddings": 16384},
        "seq": 16384,
        "mbs": 1,
        "plain": False,
        "baseline": "trainer/dense:compile",
        "kinds": ["trainer/dense", "trainer/sepllm-n256", "trainer/streamingllm-n256"],
    },
    "llama350m-64k": {
        "model": {**LLAMA350M, "max_position_embeddings": 65536},
        "seq": 65536,
        "mbs": 1,
        "plain": False,
        "baseline": "trainer/dense:compile",
        "kinds": [
            "trainer/dense",
            "trainer/sepllm-n256",
            "trainer/dense+ac",
            "trainer/sepllm-n256+ac",
            "trainer/streamingllm-n256",
        ],
    },
    # issue 38: 128K on one GPU, activation checkpointing on both sides (benchmarks/memory_model.py sizes it)
    "llama350m-128k": {
        "model": {**LLAMA350M, "max_position_embeddings": 131072},
        "seq": 131072,
        "mbs": 1,
        "plain": False,
        "baseline": "trainer/dense+ac:compile",
        "kinds": ["trainer/dense+ac", "trainer/sepllm-n256+ac"],
    },
    # issue 38: fp8 linears on both sides at 16K (attention stays bf16), beside bf16 in the same call
    "llama350m-16k-fp8": {
        "model": {**LLAMA350M, "max_position_embeddings": 16384},
        "seq": 16384,
        "mbs": 1,
        "plain": False,
        "baseline": "trainer/dense%fp8:compile",
        "kinds": [
            "trainer/dense%fp8",
            "trainer/sepllm-n256%fp8",
            "trainer/dense",
            "trainer/sepllm-n256",
        ],
        "compile_only": [
            "trainer/dense%fp8",
            "trainer/sepllm-n256%fp8",
            "trainer/dense",
            "trainer/sepllm-n256",
        ],
    },
    "tiny": {
        "model": {
            "family": "llama",
            "num_layers": 2,
            "hidden_size": 64,
            "num_heads": 4,
            "ffn_hidden_size": 128,
            "vocab_size": 500,
            "max_position_embeddings": 128,
        },
        "seq": 128,
        "mbs": 2,
        "kinds": ["sepllm:reference", "dense", "trainer/sepllm-n32:reference", "trainer/dense+ac"],
        "plain": True,
    },  # CPU smoke test
}


def parse_kind(kind: str) -> dict:
    """[trainer/]KIND[-nWINDOW][:BACKEND][+ac][~unfused][%fp8][@KERNELS][&ENGINE][^pN] -> its parts."""
    via_trainer = kind.startswith("trainer/")
    kind, _, prefetch = kind.partition("^p")
    kind, _, engine = kind.partition("&")
    rest, _, kernels = kind.removeprefix("trainer/").partition("@")
    rest, _, precision = rest.partition("%")
    rest, unfused = (rest[:-8], True) if rest.endswith("~unfused") else (rest, False)
    rest, ac = (rest[:-3], True) if rest.endswith("+ac") else (rest, False)
    name, _, backend = rest.partition(":")
    name, _, window = name.partition("-n")
    return {
        "trainer": via_trainer,
        "kind": name,
        "window": int(window) if window else None,
        "backend": backend or "auto",
        "ac": ac,
        "kernels": kernels or "auto",
        "fused_loss": not unfused,
        "precision": precision or "auto",
        "engine": engine or "native",
        "prefetch": int(prefetch) if prefetch else 1,
    }


class PlainBlock(nn.Module):
    """The baseline: a textbook Llama block (SDPA, SwiGLU, RMSNorm, RoPE) in plain PyTorch."""

    def __init__(self, h, heads, ffn):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(h), nn.RMSNorm(h)
        self.qkv, self.o = nn.Linear(h, 3 * h, bias=False), nn.Linear(h, h, bias=False)
        self.gate, self.up, self.down = (
            nn.Linear(h, ffn, bias=False),
            nn.Linear(h, ffn, bias=False),
            nn.Linear(ffn, h, bias=False),
        )

    def forward(self, x, cos, sin):
        b, s, h = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, s, 3, self.heads, h // self.heads).unbind(2)

        def rope(t):
            t1, t2 = t.chunk(2, -1)
            return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

        q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class PlainLlama(nn.Module):
    def __init__(self, m):
        super().__init__()
        h, self.heads = m["hidden_size"], m["num_heads"]
        self.embed = nn.Embedding(m["vocab_size"], h)
        self.blocks = nn.ModuleList(
            PlainBlock(h, m["num_heads"], m["ffn_hidden_size"]) for _ in range(m["num_layers"])
        )
        self.norm, self.head = nn.RMSNorm(h), nn.Linear(h, m["vocab_size"], bias=False)

    def forward(self, tokens, labels):
        s, d = tokens.shape[1], self.embed.embedding_dim // self.heads
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device=tokens.device).float() / d)
        ang = torch.arange(s, device=tokens.device).float()[:, None] * inv
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


def plain_step(model, tokens, labels):
    """The baseline's training step (bf16 autocast, fused AdamW, no clipping) as a closure."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
            loss = model(tokens, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def measure(step, cuda, steps, warmup=3):
    """Seconds per step after warm-up, (first, last) loss, peak GB. The first loss comes from the same
    weights and tokens for every variant, so backends can be compared on it."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        loss = step()
        if i == 0:
            first = loss.item()
    sync()
    dt = (time.perf_counter() - t0) / steps
    return dt, (first, loss.item()), torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan


def profile(model, tokens, labels, path, step=None) -> float:
    """GPU time per kernel over two training steps (where the step time goes), written to `path`; returns
    the kernels' total per step in ms (the GPU's busy time: the step time beyond it is the host's)."""
    from torch.profiler import ProfilerActivity, profile as prof

    step = step or plain_step(model, tokens, labels)
    with prof(activities=[ProfilerActivity.CUDA]) as pr:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = pr.key_averages()
    with open(path, "w") as f:
        f.write(table.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    return sum(e.self_device_time_total for e in table) / 2 / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=list(PRESETS), default="llama1.3b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=".")
    ap.add_argument("--modes", default="eager,compile", help="eager and/or compile (per block)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--profile", action="store_true", help="write the top kernels of one compiled step"
    )
    ap.add_argument(
        "--memory", action="store_true", help="write what is alive at a compiled step's memory peak"
    )
    ap.add_argument(
        "--append", action="store_true", help="add rows to an existing result file of the preset"
    )
    ap.add_argument(
        "--only", default="", help="comma list of plain|KIND : eager|compile to run (default all)"
    )
    args = ap.parse_args()
    p = PRESETS[args.preset]
    m, seq, mbs = p["model"], p["seq"], p["mbs"]
    modes = [mode == "compile" for mode in args.modes.split(",")]
    tokens = torch.randint(0, m["vocab_size"], (mbs, seq + 1), device=args.device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    ffn_mats = 3 if m["family"] == "llama" else 2  # SwiGLU's gate, up, down; GeLU's up, down
    matmul = (
        m["num_layers"]
        * (4 * m["hidden_size"] ** 2 + ffn_mats * m["hidden_size"] * m["ffn_hidden_size"])
        + m["vocab_size"] * m["hidden_size"]
    )
    rows = []
    path = f"{args.out}/train_throughput_{args.preset}.json"
    # one variant per process (fresh compile caches), one file
    if args.append and os.path.exists(path):
        rows = json.load(open(path))["rows"]
    only = set(filter(None, args.only.split(",")))

    def wanted(label, compiled):
        return not only or f"{label}:{'compile' if compiled else 'eager'}" in only

    import triton

    dev = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    env = {
        "device": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "mfu_peak_tflops": 989,
        "mfu_flops": "6 x matmul params + 12 x layers x hidden x seq x kept-pair share",
    }

    def record(name, dt, loss, mem, pairs=1.0, key=None, peak=989):
        """MFU counts attention FLOPs for the pairs attended: 12 x layers x hidden x seq x kept-pair share."""
        tps = mbs * seq / dt
        first, loss = loss
        attended = 6 * matmul + 12 * m["num_layers"] * m["hidden_size"] * seq * pairs
        rows.append(
            {
                "impl": name,
                "key": key,
                "step_ms": dt * 1e3,
                "tokens_per_s": tps,
                "mfu": tps * attended / (peak * 1e12),
                "mfu_peak_tflops": peak,
                "mfu_bf16_peak": tps * attended / 989e12,
                "kept_pairs": pairs,
                "flops_per_token": attended,
                "peak_mem_gb": mem,
                "first_loss": first,
                "loss": loss,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        with open(
            f"{args.out}/train_throughput_{args.preset}.json", "w"
        ) as f:  # kept if a later variant crashes
            json.dump(
                {"env": env, "preset": args.preset, "seq": seq, "micro_batch": mbs, "rows": rows},
                f,
                indent=1,
            )

    for compiled in [c for c in modes if p["plain"] and wanted("plain", c)]:
        torch.manual_seed(0)
        plain = PlainLlama(m).to(args.device)
        if compiled:
            for blk in plain.blocks:
                blk.compile()
        # one optimizer: its state exists after the first step
        step = plain_step(plain, inputs, labels)
        record(
            f"plain pytorch{' + compile per block' if compiled else ' eager'}",
            *measure(step, tokens.is_cuda, args.steps),
        )
        if args.profile and compiled:
            profile(plain, inputs, labels, f"{args.out}/profile_{args.preset}_plain.txt", step=step)
        if args.memory and compiled:
            memory_at_peak(step, f"{args.out}/memory_{args.preset}_plain.txt")
        del plain
        torch.cuda.empty_cache()
    for kind in p["kinds"]:
        k = parse_kind(kind)
        for compiled in [
            c for c in modes if (c or kind not in p.get("compile_only", ())) and wanted(kind, c)
        ]:
            window = k["window"] or min(256, seq // 4)
            attention = (
                {
                    "kind": k["kind"],
                    "window": window,
                    "init_tokens": 3,
                    "separators": list(range(1, m["vocab_size"] // 10)),  # 10% of random tokens
                    "backend": k["backend"],
                }
                if k["kind"] != "dense"
                else {"kind": "dense"}
            )
            cfg = config_from_dict(
                {
                    "model": {**m, "kernels": k["kernels"], "fused_loss": k["fused_loss"]},
                    "attention": attention,
                    "data": {"seq_len": seq, "mock": True, "prefetch": k["prefetch"]},
                    "train": {
                        "run_dir": f"{args.out}/trainer_run",
                        "micro_batch_size": mbs,
                        "steps": 10_000,
                        "compile": compiled,
                        "device": args.device,
                        "precision": k["precision"],
                        "activation_checkpointing": "full" if k["ac"] else "none",
                    },
                    "optim": {"warmup_steps": 2},
                    "parallel": {"engine": k["engine"]},
                }
            )
            torch.manual_seed(0)
            label = f"megatron-sep {kind}{' + compile per block' if compiled else ' eager'}"
            model = None
            try:
                if k[
                    "trainer"
                ]:  # the Trainer's own step: plan, autocast, clipping, schedule, optimizer
                    from megatron_sep.training import Trainer

                    model = Trainer(cfg, log=False)
                    pairs = kept_pairs(cfg, model)
                    train_loss = model.train_step  # returns (loss, grad norm)
                    record(
                        label,
                        *measure(lambda: train_loss()[0], model.device.type == "cuda", args.steps),
                        pairs=pairs,
                        key=f"{kind}:{'compile' if compiled else 'eager'}",
                        peak=model.run_state.peak / 1e12 if model.run_state.peak else 989,
                    )
                else:
                    model = build_model(cfg).to(args.device)
                    if compiled:
                        for blk in model.layers:
                            blk.compile()
                    record(
                        label,
                        *measure(plain_step(model, inputs, labels), tokens.is_cuda, args.steps),
                    )
                name = "".join(c if c.isalnum() or c in "-." else "_" for c in kind)
                if args.profile and compiled:
                    gpu_ms = profile(
                        model,
                        inputs,
                        labels,
                        f"{args.out}/profile_{args.preset}_{name}.txt",
                        step=(lambda: train_loss()[0]) if k["trainer"] else None,
                    )
                    # host time per step: the step's wall time the GPU spends idle (issue 38's row)
                    rows[-1].update(gpu_ms=gpu_ms, host_ms=rows[-1]["step_ms"] - gpu_ms)
                    print(
                        json.dumps(
                            {"impl": label, "gpu_ms": gpu_ms, "host_ms": rows[-1]["host_ms"]}
                        )
                    )
                if args.memory and compiled and k["trainer"]:
                    memory_at_peak(
                        lambda: train_loss()[0], f"{args.out}/memory_{args.preset}_{name}.txt"
                    )
            except Exception as e:  # record what failed instead of losing the whole run
                rows.append(
                    {"impl": f"megatron-sep {kind} compiled={compiled}", "error": repr(e)[:300]}
                )
                print(json.dumps(rows[-1]), flush=True)
            del model
            torch.cuda.empty_cache() if args.device == "cuda" else None
    baseline = p.get("baseline")
    base = next(
        (
            r
            for r in rows
            if "tokens_per_s" in r
            and (
                r.get("key") == baseline
                if baseline
                else r["impl"] == "plain pytorch + compile per block"
            )
        ),
        None,
    )
    name = baseline or "compiled plain"
    for r in rows:
        if "tokens_per_s" in r:
            r[f"x_vs_{name}"] = ratio = (
                r["tokens_per_s"] / base["tokens_per_s"] if base else math.nan
            )
            print(
                f"{r['impl']:<58} {r['tokens_per_s']:>10,.0f} tok/s  MFU {r['mfu']:.1%}  "
                f"x{ratio:.2f} vs {name}  {r['peak_mem_gb']:.1f} GB"
            )
    with open(f"{args.out}/train_throughput_{args.preset}.json", "w") as f:
        json.dump(
            {
                "env": env,
                "preset": args.preset,
                "seq": seq,
                "micro_batch": mbs,
                "baseline": name,
                "rows": rows,
            },
            f,
            indent=1,
        )


def kept_pairs(cfg, trainer) -> float:
    """Share of causal (query, key) pairs attended, averaged over layers, on a training micro-batch."""
    if cfg.attention.kind == "dense":
        return 1.0
    from megatron_sep.model.attention import attention_stats

    tokens, _, batch = trainer.micro_batch(trainer.train_ds, 0, cfg.train.micro_batch_size)
    return attention_stats(cfg, batch.is_sep)["kept_pairs"]


if __name__ == "__main__":
    main()
