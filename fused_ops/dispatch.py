"""Shared by the fused ops: the backend choice (Triton on CUDA, the PyTorch reference elsewhere) and small
launch helpers."""

from __future__ import annotations

import importlib.util

import torch

# found once at import: a cached function here made torch.compile warn on every traced call
TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return TRITON


def use_triton(backend: str, tensor) -> bool:
    if backend == "reference":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend 'triton' asked for, but triton is not installed. Fix: pip install "
                "-e '.[gpu]' (or pip install triton), or use the reference backend"
            )
        return True
    if backend != "auto":
        raise ValueError(f"unknown fused-op backend {backend!r}; use auto, triton or reference")
    return tensor.is_cuda and triton_available()


def plain_call(*tensors) -> bool:
    """Nothing to differentiate and nothing tracing: a fused op may launch its kernel directly. Its custom op's
    dispatch costs about 0.15 ms of host time per call, which binds eager decoding at batch 1."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


_SMS: dict = {}  # multiprocessor count per device, asked once (a device query per launch is host time)


def multiprocessors(device) -> int:
    """The device's SM count (4 off CUDA, where the Triton interpreter runs the kernels)."""
    if device.type != "cuda":
        return 4
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


def strides(names: tuple, t: torch.Tensor) -> dict:
    """Keyword arguments for a kernel's stride parameters of t, one name per leading dim:
    strides(("sqb", "sqh", "sqs"), q) -> {"sqb": q.stride(0), ...}; the last dim is contiguous and has none."""
    return dict(zip(names, t.stride()))
