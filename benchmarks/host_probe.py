"""Host time per call of SepAttention at 4K (eager): the raw kernel launches without autograd, and the
whole forward+backward through the custom op; then a cProfile of the whole call. (The measured
session also timed a plain autograd.Function in place of the custom op: the same host time.)
Run on the device: PYTHONPATH=. python3 benchmarks/host_probe.py"""

import cProfile
import json
import pstats
import time

import torch

from fused_ops import sep_attention_triton as kern
from fused_ops.sep_plan import build_plan

s = 4096
q, k, v = (
    torch.randn(1, 16, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(3)
)
is_sep = torch.rand(1, s, device="cuda") < 0.1
go = torch.randn_like(q)
plan = build_plan(is_sep, 3, [256], "triton", tile_rows=kern.tile_rows())
launch = kern.launch_config(s=s)  # the shapes sep_attention_triton uses at this length
args = kern.forward_args(q, k, v, plan, 256, 128**-0.5, launch)
with torch.no_grad():
    o, lse = kern.launch_forward(*args)
bargs = (
    go,
    q.detach(),
    k.detach(),
    v.detach(),
    o,
    lse,
    plan.index,
    plan.gpos,
    plan.slot,
    plan.bounds[(256, launch.dq.BM)],
    None,
    256,
    128**-0.5,
    launch.as_ints(),
)


def host(fn, n=100):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    h = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    return round(h, 4), round((time.perf_counter() - t) / n * 1e3, 4)


def whole():
    q.grad = k.grad = v.grad = None
    kern.sep_attention_triton(q, k, v, is_sep, 3, 256, plan=plan).backward(go)


def raw_fb():
    with torch.no_grad():
        kern.launch_forward(*args)
    kern.launch_backward(*bargs)


with torch.no_grad():
    out = {
        "fwd_raw": host(lambda: kern.launch_forward(*args)),
        "fwd_op": host(lambda: kern.sep_attn_fwd(*args)),
    }
out.update(
    {
        "bwd_raw": host(lambda: kern.launch_backward(*bargs)),
        "raw_fwd_bwd": host(raw_fb),
        "whole": host(whole),
        "sync": host(torch.cuda.synchronize),
    }
)
print(json.dumps(out))
prof = cProfile.Profile()
prof.enable()
for _ in range(50):
    whole()
torch.cuda.synchronize()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(14)
