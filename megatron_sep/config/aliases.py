"""Megatron-LM and GPT-NeoX argument names, and the forms of their values this config also reads.

A foreign name is never taken silently: its meaning or units may differ (NeoX's `warmup` is a fraction,
Megatron's `num_layers_per_virtual_pipeline_stage` counts layers, not chunks), so the error names our key.
`data.split` may be Megatron's "969,30,1" string, and `data.paths` its weighted "0.3 A 0.7 B" string.
"""

from __future__ import annotations

import re

from .schema import ConfigError

MEGATRON, NEOX, BOTH = "Megatron-LM", "GPT-NeoX", "Megatron-LM / GPT-NeoX"

# foreign name -> (our key, where it comes from, a note when the value does not carry over as is)
ALIASES: dict[str, tuple[str, str, str]] = {
    "num_attention_heads": ("model.num_heads", BOTH, ""),
    "num_query_groups": ("model.num_kv_heads", MEGATRON, ""),
    "seq_length": ("data.seq_len", BOTH, ""),
    "layernorm_epsilon": ("model.norm_eps", BOTH, ""),
    "norm_epsilon": ("model.norm_eps", MEGATRON, ""),
    "rotary_percent": ("model.rotary_pct", MEGATRON, ""),
    "rotary_emb_base": ("model.rotary_base", NEOX, ""),
    "normalization": (
        "model.family",
        MEGATRON,
        "RMSNorm + SwiGLU is family llama, LayerNorm + GeLU is neox",
    ),
    "swiglu": ("model.family", MEGATRON, "family llama has SwiGLU"),
    "norm": ("model.family", NEOX, "rmsnorm is family llama, layernorm is neox"),
    "gpt_j_residual": ("model.family", NEOX, "family neox has the parallel residual"),
    "untie_embeddings_and_output_weights": (
        "model.tie_embeddings",
        MEGATRON,
        "with the opposite sign",
    ),
    "no_weight_tying": ("model.tie_embeddings", NEOX, "with the opposite sign"),
    "tensor_model_parallel_size": ("parallel.tp", MEGATRON, ""),
    "model_parallel_size": ("parallel.tp", NEOX, ""),
    "pipeline_model_parallel_size": ("parallel.pp", MEGATRON, ""),
    "pipe_parallel_size": ("parallel.pp", NEOX, ""),
    "context_parallel_size": ("parallel.cp", MEGATRON, ""),
    "data_parallel_size": ("parallel.dp", MEGATRON, ""),
    "num_layers_per_virtual_pipeline_stage": (
        "parallel.virtual_stages",
        MEGATRON,
        "ours counts model chunks per rank: layers / (pp x this)",
    ),
    "virtual_pipeline_model_parallel_size": ("parallel.virtual_stages", MEGATRON, ""),
    "use_distributed_optimizer": ("parallel.zero", MEGATRON, "true is zero: 1"),
    "zero_optimization": (
        "parallel.zero",
        NEOX,
        "stage 1 is zero: 1; stages 2 and 3 are not offered",
    ),
    "train_iters": ("train.steps", BOTH, ""),
    "train_micro_batch_size_per_gpu": ("train.micro_batch_size", NEOX, ""),
    "train_batch_size": ("train.global_batch_size", NEOX, ""),
    "gradient_accumulation_steps": (
        "train.global_batch_size",
        NEOX,
        "ours is micro_batch_size x dp x accumulation steps",
    ),
    "lr_decay_style": ("optim.schedule", BOTH, "cosine, linear, constant and wsd"),
    "lr_warmup_iters": ("optim.warmup_steps", MEGATRON, ""),
    "lr_warmup_fraction": ("optim.warmup_fraction", MEGATRON, ""),
    "warmup": ("optim.warmup_fraction", NEOX, ""),
    "lr_decay_iters": ("train.steps", BOTH, "the schedule decays over train.steps"),
    "adam_beta1": ("optim.beta1", MEGATRON, ""),
    "adam_beta2": ("optim.beta2", MEGATRON, ""),
    "adam_eps": ("optim.eps", MEGATRON, ""),
    "gradient_clipping": ("optim.clip_grad", NEOX, ""),
    "bf16": ("train.precision", BOTH, "precision: bf16"),
    "fp16": ("train.precision", BOTH, "bf16 (or fp32) only; fp16 with loss scaling is not offered"),
    "fp8_format": ("train.precision", MEGATRON, "precision: fp8 (tensorwise scaling)"),
    "recompute_granularity": ("train.activation_checkpointing", MEGATRON, "full or selective"),
    "checkpoint_activations": ("train.activation_checkpointing", NEOX, "true is full"),
    "save": ("train.run_dir", BOTH, "checkpoints go to run_dir/checkpoints"),
    "load": ("checkpoint.load", BOTH, ""),
    "checkpoint_factor": ("checkpoint.save_interval", NEOX, ""),
    "keep_last_n_checkpoints": ("checkpoint.keep_last", NEOX, ""),
    "extra_save_iters": ("checkpoint.extra_save_steps", NEOX, "0 is the initial weights"),
    "use_wandb": ("logging.wandb", NEOX, ""),
    "data_path": ("data.paths", BOTH, "Megatron's weighted '0.3 A 0.7 B' string is read too"),
    "train_data_paths": ("data.paths", NEOX, ""),
    "train_data_weights": ("data.weights", NEOX, ""),
    "vocab_file": ("data.tokenizer", BOTH, "the vocab.json; merges.txt is found beside it"),
    "merge_file": ("data.tokenizer", BOTH, "the vocab.json beside it"),
    "tokenizer_model": ("data.tokenizer", MEGATRON, ""),
    "tokenizer_type": ("data.tokenizer", BOTH, "the tokenizer's file decides its type"),
    "tensorboard_dir": (
        "logging.tensorboard",
        BOTH,
        "written under run_dir/tensorboard when true",
    ),
    "mock_data": ("data.mock", MEGATRON, ""),
}


def alias_of(name: str) -> tuple[str, str] | None:
    """(our key, "Megatron-LM's train_iters is train.steps" plus a note) for a foreign name; else None."""
    name = name.replace("-", "_").lstrip("_")
    hit = ALIASES.get(name)
    if hit is None:
        return None
    key, source, note = hit
    return key, f"{source}'s {name} is {key}" + (f" ({note})" if note else "")


def megatron_split(value):
    """'969,30,1' (or '969 30 1', or '98/1/1') -> [969.0, 30.0, 1.0]; anything else unchanged."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,/\s]+", value.strip()) if p]
        try:
            return [float(p) for p in parts]
        except ValueError:
            raise ConfigError(
                "data.split",
                value,
                "is neither a list nor Megatron's 'train,valid,test' string",
                "write [0.98, 0.01, 0.01] or '969,30,1'",
            ) from None
    return value


def megatron_paths(paths, weights):
    """Megatron's weighted path list ('0.3 A 0.7 B', as one string or as a list) -> (paths, weights)."""
    if isinstance(paths, str):
        paths = paths.split()
    if (
        not isinstance(paths, list)
        or not paths
        or not all(isinstance(p, (str, int, float)) for p in paths)
    ):
        return paths, weights

    def number(x):
        try:
            return float(x)
        except (TypeError, ValueError):
            return None

    if number(paths[0]) is None:
        return paths, weights  # plain paths
    numbers = [number(p) for p in paths[0::2]]
    if (
        len(paths) % 2
        or not all(n is not None for n in numbers)
        or not all(isinstance(p, str) and number(p) is None for p in paths[1::2])
    ):
        raise ConfigError(
            "data.paths",
            " ".join(map(str, paths)),
            "reads as Megatron's weighted list (it starts with "
            "a number) but is not 'weight path weight path ...'",
            "give a path after every weight",
        )
    if weights is not None:
        raise ConfigError(
            "data.weights",
            weights,
            "is given twice: data.paths already carries weights",
            "drop data.weights, or the weights inside data.paths",
        )
    return [str(p) for p in paths[1::2]], numbers
