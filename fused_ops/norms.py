"""LayerNorm / RMSNorm over the last dimension, with an optional fused residual add.

The PyTorch reference lives here; the Triton kernels (CUDA) slot in behind the
same public functions. With `residual` given, they return `(norm(x + residual),
x + residual)`, the pre-norm block's two outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import use_triton


def layer_norm_ref(x, weight, bias, eps):
    return F.layer_norm(
        x.float(),
        x.shape[-1:],
        weight.float() if weight is not None else None,
        bias.float() if bias is not None else None,
        eps,
    ).to(x.dtype)


def rms_norm_ref(x, weight, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def layer_norm(
    x: torch.Tensor, weight, bias, eps: float = 1e-5, residual=None, backend: str = "auto"
):
    if use_triton(backend, x):
        from .norms_triton import norm_triton

        return norm_triton(x, weight, bias, eps, residual, is_rms=False)
    if residual is not None:
        x = x + residual
        return layer_norm_ref(x, weight, bias, eps), x
    return layer_norm_ref(x, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight, eps: float = 1e-6, residual=None, backend: str = "auto"):
    if use_triton(backend, x):
        from .norms_triton import norm_triton

        return norm_triton(x, weight, None, eps, residual, is_rms=True)
    if residual is not None:
        x = x + residual
        return rms_norm_ref(x, weight, eps), x
    return rms_norm_ref(x, weight, eps)
