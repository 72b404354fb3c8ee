"""Training throughput on one GPU: this framework against a plain PyTorch model of the same shape,
measured in the same run. Also the SepLLM training step with each attention backend.

Run on the device:
  PYTHONPATH=. python3 benchmarks/train_throughput.py --preset llama1.3b --out DIR
  PYTHONPATH=. python3 benchmarks/train_throughput.py --preset sepllm350m-16k --out DIR
Synthetic tokens (data loading is not what is measured). MFU uses 989 TFLOP/s (H100 dense bf16)
and the PaLM convention: 6 x matmul params + 12 x layers x hidden x seq FLOPs per token.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_sep.config import config_from_dict
from megatron_sep.model import GPT

PRESETS = {
    "llama1.3b": {"model": {"family": "llama", "num_layers": 24, "hidden_size": 2048, "num_heads": 16,
                            "ffn_hidden_size": 5504, "vocab_size": 32000, "max_position_embeddings": 4096},
                  "seq": 4096, "mbs": 2, "kinds": ["dense@reference", "dense", "trainer/dense"], "plain": True,
                  "compile_only": ["dense@reference"]},
    "sepllm350m-16k": {"model": {"family": "llama", "num_layers": 24, "hidden_size": 1024, "num_heads": 16,
                                 "ffn_hidden_size": 2816, "vocab_size": 32000, "max_position_embeddings": 16384},
                       "seq": 16384, "mbs": 1, "kinds": ["sepllm:triton", "sepllm:flex", "dense"], "plain": False},
    "tiny": {"model": {"family": "llama", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "ffn_hidden_size": 128,
                       "vocab_size": 500, "max_position_embeddings": 128},
             "seq": 128, "mbs": 2, "kinds": ["sepllm:reference", "dense", "trainer/sepllm:reference"],
             "plain": True},  # CPU smoke test
}


class PlainBlock(nn.Module):
    """The baseline: a textbook Llama block (SDPA, SwiGLU, RMSNorm, RoPE) in plain PyTorch."""

    def __init__(self, h, heads, ffn):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(h), nn.RMSNorm(h)
        self.qkv, self.o = nn.Linear(h, 3 * h, bias=False), nn.Linear(h, h, bias=False)
        self.gate, self.up, self.down = (nn.Linear(h, ffn, bias=False), nn.Linear(h, ffn, bias=False),
                                         nn.Linear(ffn, h, bias=False))

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
        self.blocks = nn.ModuleList(PlainBlock(h, m["num_heads"], m["ffn_hidden_size"]) for _ in range(m["num_layers"]))
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


def profile(model, tokens, labels, path):
    """GPU time per kernel over two training steps (where the step time goes)."""
    from torch.profiler import ProfilerActivity, profile as prof
    step = plain_step(model, tokens, labels)
    with prof(activities=[ProfilerActivity.CUDA]) as pr:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(pr.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=list(PRESETS), default="llama1.3b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=".")
    ap.add_argument("--modes", default="eager,compile", help="eager and/or compile (per block)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", action="store_true", help="write the top kernels of one compiled step")
    ap.add_argument("--only", default="", help="comma list of plain|KIND : eager|compile to run (default all)")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    m, seq, mbs = p["model"], p["seq"], p["mbs"]
    modes = [mode == "compile" for mode in args.modes.split(",")]
    tokens = torch.randint(0, m["vocab_size"], (mbs, seq + 1), device=args.device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    matmul = (m["num_layers"] * (4 * m["hidden_size"] ** 2 + 3 * m["hidden_size"] * m["ffn_hidden_size"])
              + m["vocab_size"] * m["hidden_size"])
    flops = 6 * matmul + 12 * m["num_layers"] * m["hidden_size"] * seq
    rows = []
    only = set(filter(None, args.only.split(",")))

    def wanted(label, compiled):
        return not only or f"{label}:{'compile' if compiled else 'eager'}" in only

    import triton
    dev = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    env = {"device": dev, "torch": torch.__version__, "triton": triton.__version__}

    def record(name, dt, loss, mem):
        tps = mbs * seq / dt
        first, loss = loss
        rows.append({"impl": name, "step_ms": dt * 1e3, "tokens_per_s": tps, "mfu": tps * flops / 989e12,
                     "peak_mem_gb": mem, "first_loss": first, "loss": loss})
        print(json.dumps(rows[-1]), flush=True)
        with open(f"{args.out}/train_throughput_{args.preset}.json", "w") as f:  # kept if a later variant crashes
            json.dump({"env": env, "preset": args.preset, "seq": seq, "micro_batch": mbs, "flops_per_token": flops,
                       "rows": rows}, f, indent=1)

    for compiled in [c for c in modes if p["plain"] and wanted("plain", c)]:
        torch.manual_seed(0)
        plain = PlainLlama(m).to(args.device)
        if compiled:
            for blk in plain.blocks:
                blk.compile()
        record(f"plain pytorch{' + compile per block' if compiled else ' eager'}",
               *measure(plain_step(plain, inputs, labels), tokens.is_cuda, args.steps))
        if args.profile and compiled:
            profile(plain, inputs, labels, f"{args.out}/profile_{args.preset}_plain.txt")
        del plain
        torch.cuda.empty_cache()
    for kind in p["kinds"]:  # [trainer/]attention kind[:backend][@model.kernels]
        via_trainer = kind.startswith("trainer/")
        kind_backend, _, kernels = kind.removeprefix("trainer/").partition("@")
        name, _, backend = kind_backend.partition(":")
        for compiled in [c for c in modes if (c or kind not in p.get("compile_only", ())) and wanted(kind, c)]:
            attention = {"kind": name, "window": min(256, seq // 4), "init_tokens": 3,
                         "separators": list(range(1, m["vocab_size"] // 10)),
                         "backend": backend or "auto"} if name != "dense" else {"kind": "dense"}
            cfg = config_from_dict({"model": {**m, "kernels": kernels or "auto"}, "attention": attention,
                                    "data": {"seq_len": seq, "mock": True},
                                    "train": {"run_dir": f"{args.out}/trainer_run", "micro_batch_size": mbs,
                                              "steps": 10_000, "compile": compiled, "device": args.device},
                                    "optim": {"warmup_steps": 2}})
            torch.manual_seed(0)
            label = f"megatron-sep {kind}{' + compile per block' if compiled else ' eager'}"
            try:
                if via_trainer:  # the Trainer's own step: plan, autocast, clipping, schedule, optimizer
                    from megatron_sep.training import Trainer
                    model = Trainer(cfg, log=False)
                    train_loss = model.train_step  # returns (loss, grad norm)
                    record(label, *measure(lambda: train_loss()[0], model.device.type == "cuda", args.steps))
                else:
                    model = GPT(cfg).to(args.device)
                    if compiled:
                        for blk in model.layers:
                            blk.compile()
                    record(label, *measure(plain_step(model, inputs, labels), tokens.is_cuda, args.steps))
                if args.profile and compiled and not via_trainer:
                    profile(model, inputs, labels, f"{args.out}/profile_{args.preset}_{kind}.txt")
            except Exception as e:  # record what failed instead of losing the whole run
                rows.append({"impl": f"megatron-sep {kind} compiled={compiled}", "error": repr(e)[:300]})
                print(json.dumps(rows[-1]), flush=True)
            del model
            torch.cuda.empty_cache()
    base = next((r for r in rows if r["impl"] == "plain pytorch + compile per block" and "tokens_per_s" in r), None)
    for r in rows:
        if "tokens_per_s" in r:
            ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else math.nan
            print(f"{r['impl']:<45} {r['tokens_per_s']:>10,.0f} tok/s  MFU {r['mfu']:.1%}  "
                  f"x{ratio:.2f} vs compiled plain  {r['peak_mem_gb']:.1f} GB")


if __name__ == "__main__":
    main()
