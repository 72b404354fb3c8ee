"""`train.precision: fp8`: the transformer blocks' linear layers run their matmuls in float8 through
torchao's float8 training (dynamic tensorwise scales: e4m3 for inputs and weights, e5m2 for gradients).

Embeddings, norms, attention, the LM head and the loss stay in bf16 autocast. Parameters keep their names,
their fp32 master form and their identity, so the optimizer, checkpoints, export-hf and bf16 runs see the
same model. Under tensor parallelism each rank scales its own shard (torchao's own TP does the same)."""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from ..config import Config, ConfigError
from .layers import ColumnParallelLinear, RowParallelLinear

LINEARS = (("attn", "qkv"), ("attn", "out"), ("mlp", "gate"), ("mlp", "up"), ("mlp", "down"))
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (L40S, RTX 4090) and Hopper (H100, H200) onwards


def check_device(device: torch.device) -> None:
    """Before any work: fp8 needs a GPU with float8 tensor cores."""
    if device.type != "cuda":
        have = "no GPU"
    elif torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        have = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    else:
        return
    raise ConfigError(
        "train.precision",
        "fp8",
        f"needs a GPU with float8 tensor cores (compute capability 8.9+: "
        f"H100, H200, L40S); this run has {have}",
        "use train.precision: bf16 (or auto)",
    )


def torchao_float8():
    """torchao's public float8 conversion and its config, or a ConfigError naming the install."""
    # float8 training uses none of its C++ ops
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    # quiet at import: torchao says it skipped its C++ ops, newer torch warns about its enum registration
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ConfigError(
            "train.precision",
            "fp8",
            f"needs torchao, which does not import here ({e})",
            "pip install 'torchao>=0.17' (the project's [fp8] extra)",
        ) from None
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    return convert_to_float8_training, Float8LinearConfig


def check_shapes(cfg: Config) -> None:
    """float8 matmuls need every dimension a multiple of 16; the tokens of a micro-batch a rank multiplies
    (its slice of the sequence under context parallelism) are one of them."""
    cp = cfg.parallel.cp
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len // cp
    if tokens % 16:
        per = f" per cp rank (cp={cp})" if cp > 1 else ""
        raise ConfigError(
            "data.seq_len",
            cfg.data.seq_len,
            f"gives {tokens} tokens per micro-batch{per}, not a "
            "multiple of 16 as float8 matmuls need",
            "use a seq_len (x micro_batch_size / cp) divisible by 16",
        )


def convert(layers) -> tuple[int, list[str]]:
    """In place, after tensor parallelism and before compile. Returns (converted count, linears left in bf16)."""
    to_float8, Float8LinearConfig = torchao_float8()
    config = Float8LinearConfig()  # dynamic tensorwise scaling, torchao's default recipe
    done, kept = 0, []
    for i, block in enumerate(layers):
        for part, name in LINEARS:
            mod = getattr(getattr(block, part, None), name, None)
            if mod is None:
                continue
            if mod.weight.shape[0] % 16 or mod.weight.shape[1] % 16:
                kept.append(f"layer {i} {part}.{name} {tuple(mod.weight.shape)}")
                continue
            if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
                mod.fp8 = _shard_matmul(to_float8, config, mod.weight)
            elif type(mod) is nn.Linear:
                to_float8(
                    getattr(block, part),
                    config=config,
                    module_filter_fn=lambda m, fqn, n=name: fqn == n,
                )
            else:
                kept.append(f"layer {i} {part}.{name} ({type(mod).__name__})")
                continue
            done += 1
    return done, kept


def _shard_matmul(to_float8, config, weight: nn.Parameter):
    """torchao's float8 x W^T over a tensor-parallel shard: a converted shell linear that shares the shard's
    parameter. It stays out of the module tree (a bound method, not a submodule), so state_dict and the
    optimizer still see the one weight under its own name."""
    with torch.device("meta"):
        shell = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    to_float8(shell, config=config)
    shell[0].weight = weight
    return shell[0].forward
