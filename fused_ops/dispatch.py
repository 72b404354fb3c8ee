"""Backend choice shared by the fused ops: Triton on CUDA, the PyTorch reference elsewhere."""
from __future__ import annotations

import importlib.util

# found once at import: a cached function here made torch.compile warn on every traced call
TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return TRITON


def use_triton(backend: str, tensor) -> bool:
    if backend == "reference":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' asked for, but triton is not installed. Fix: pip install "
                               "megatron-sep[gpu], or use the reference backend")
        return True
    if backend != "auto":
        raise ValueError(f"unknown fused-op backend {backend!r}; use auto, triton or reference")
    return tensor.is_cuda and triton_available()
