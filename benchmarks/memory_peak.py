"""What is alive on the GPU at a training step's memory peak, grouped by the code that allocated it.

Used by train_throughput.py --memory. torch's allocator history records every allocation of one step with
its Python stack; replaying allocs and frees finds the peak and the live set at that moment. Memory alive
before the step (parameters, optimizer state) is reported as one line, from memory_allocated()."""

from __future__ import annotations

import collections

import torch

OURS = ("megatron_sep/", "fused_ops/", "benchmarks/")


def site(frames) -> str:
    """The innermost frame in project code, else in generated (inductor) code, else the innermost frame."""
    for want in (OURS, ("torchinductor",)):
        for f in frames:
            if any(w in f["filename"] for w in want):
                name = f["filename"].split("/site-packages/")[-1].split("/torchinductor_")[-1]
                return f"{name}:{f['line']} {f['name']}"
    f = frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
    return f"{f['filename'].split('/site-packages/')[-1]}:{f['line']} {f['name']}"


def memory_at_peak(step, path: str, top: int = 30) -> dict:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak = {}, 0, 0, {}
    for e in snap["device_traces"][torch.cuda.current_device()]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            total += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
        else:
            continue
        if total > peak:
            peak, at_peak = total, dict(live)
    groups = collections.Counter()
    for size, frames in at_peak.values():
        groups[site(frames)] += size
    gb = 2**30
    lines = [
        f"alive before the step (parameters, grads kept, optimizer state): {before / gb:.2f} GB",
        f"allocated during the step and alive at its peak: {peak / gb:.2f} GB "
        f"(peak {(before + peak) / gb:.2f} GB)",
        "",
    ]
    lines += [f"{size / gb:8.3f} GB  {name}" for name, size in groups.most_common(top)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"before_gb": before / gb, "step_peak_gb": peak / gb}
