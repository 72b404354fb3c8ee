"""Backend choice shared by the fused ops: Triton on CUDA, the PyTorch reference elsewhere."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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
