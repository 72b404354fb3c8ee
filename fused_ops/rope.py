"""Rotary position embedding, half-split (GPT-NeoX / Llama) convention.

Only the first `rotary_dim` channels of each head are rotated (partial rotary,
as in Pythia's rotary_pct=0.25); the rest pass through. Angles are computed in
fp32 from explicit position ids, so packed documents and KV-cache offsets work.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, base: float = 10000.0):
    """cos, sin of shape [*position_ids.shape, rotary_dim // 2], fp32."""
    inv_freq = 1.0 / (
        base
        ** (
            torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32)
            / rotary_dim
        )
    )
    angles = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def _rotate_ref(x, cos, sin, rotary_dim):
    # x: [b, s, h, d]; cos/sin: [b, s, rotary_dim/2] or [s, rotary_dim/2]
    half = rotary_dim // 2
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    xf = x[..., :rotary_dim].float()
    x1, x2 = xf[..., :half], xf[..., half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def rotate(x, position_ids, rotary_dim, base=10000.0):
    """One tensor x [b, s, h, d] rotated at positions [b, s] or [s] (PyTorch), e.g. cached keys moved to new
    positions by a streaming cache."""
    cos, sin = rope_cos_sin(position_ids, rotary_dim, base)
    return _rotate_ref(x, cos, sin, rotary_dim)


def apply_rope_ref(q, k, position_ids, rotary_dim, base=10000.0):
    cos, sin = rope_cos_sin(position_ids, rotary_dim, base)
    return _rotate_ref(q, cos, sin, rotary_dim), _rotate_ref(k, cos, sin, rotary_dim)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    rotary_dim: int,
    base: float = 10000.0,
    backend: str = "auto",
):
    """Rotate q [b, s, hq, d] and k [b, s, hk, d] at positions [b, s] (or [s])."""
    if use_triton(backend, q):
        from .rope_triton import apply_rope_triton

        return apply_rope_triton(q, k, position_ids, rotary_dim, base)
    return apply_rope_ref(q, k, position_ids, rotary_dim, base)
