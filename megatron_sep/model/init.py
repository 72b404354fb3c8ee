"""Weight initialisation as in GPT-NeoX (small_init + wang_init) and Megatron (scaled normal)."""

from __future__ import annotations

import math

import torch.nn as nn

from ..config import ModelConfig


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    method = cfg.init_method
    if method == "auto":
        method = cfg.parts.init
    h, layers = cfg.hidden_size, cfg.num_layers
    if method == "neox":  # small_init (Nguyen & Salazar) for inputs, wang_init for outputs
        std_in, std_out = math.sqrt(2.0 / (5 * h)), 2.0 / (layers * math.sqrt(h))
    elif method == "scaled_normal":  # Megatron: output layers scaled by 1/sqrt(2L)
        std_in, std_out = cfg.init_std, cfg.init_std / math.sqrt(2.0 * layers)
    else:
        std_in = std_out = cfg.init_std
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out_proj = name.endswith(("attn.out", "mlp.down"))
            nn.init.normal_(module.weight, mean=0.0, std=std_out if out_proj else std_in)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std_in)
