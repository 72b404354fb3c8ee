"""`import-neox`: a GPT-NeoX YAML config (with SepLLM's own NeoX flags) -> our config, and a GPT-NeoX /
DeepSpeed pipeline checkpoint (any tensor-parallel degree) -> a project checkpoint.

The checkpoint is DeepSpeed's per-layer layout: `global_stepN/layer_LL-model_TT-model_states.pt`, layer 0
the embedding, 2 .. L+1 the transformer layers, then the final norm and the output layer; TT is the tensor-
parallel rank. Shards are merged (column-parallel weights on dim 0, row-parallel on dim 1, the rest
replicated), renamed to transformers' GPT-NeoX names, and go through the same map as `import-hf`. The
fused qkv is per head [q, k, v] in both, so it needs no reordering.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

from ..config import ConfigError, config_from_dict, dump_config
from ..config.load import yaml_problem
from ..data.tokenizer import TokenizerError, first_line, load_tokenizer
from ..model.gpt import padded_vocab
from ..outdir import prepare_out
from .hf import ConversionError, from_hf_state
from .output import refuse_checkpoint_dir, save_imported

# options that change what the model computes, and the reason we cannot take them
UNSUPPORTED = {
    "pos_emb": lambda v: v != "rotary" and f"position embedding {v!r}: only rotary is implemented",
    "USE_BiPE": lambda v: (
        bool(v) and "SepLLM's BiPE (bilevel positional encoding) is not implemented"
    ),
    "attention_config": lambda v: (
        _sparse(v)
        and f"attention types {_sparse(v)}: only global (dense) "
        "attention, or SepLLM through its own flags, is implemented"
    ),
    "optimizer": lambda v: (
        str((v or {}).get("type", "adam")).lower() not in ("adam", "adamw")
        and f"optimizer {v.get('type')!r}: only AdamW is implemented"
    ),
    "lr_decay_style": lambda v: (
        v not in ("cosine", "linear", "constant")
        and f"lr_decay_style {v!r}: cosine, linear and constant are implemented"
    ),
}
# nothing to set here: launcher, kernel fusions, init recipes, DeepSpeed's logging cadence
QUIET = {
    "launcher",
    "hostfile",
    "deepspeed_slurm",
    "deepspeed",
    "distributed_backend",
    "data_impl",
    "num_workers",
    "scaled_upper_triang_masked_softmax_fusion",
    "scaled_masked_softmax_fusion",
    "bias_gelu_fusion",
    "bias_dropout_fusion",
    "rope_fusion",
    "output_layer_parallelism",
    "init_method",
    "output_layer_init_method",
    "checkpoint_num_layers",
    "partition_activations",
    "synchronize_each_layer",
    "steps_per_print",
    "wall_clock_breakdown",
    "extra_save_iters",
    "keep_last_n_checkpoints",
    "tensorboard_dir",
    "log_dir",
    "use_wandb",
    "wandb_group",
    "wandb_host",
    "wandb_team",
    "world_size",
    "num_gpus",
    "global_num_gpus",
    "PADDING_ID",
    "BATCH_ADAPTIVE_INIT_POS",
    "USE_SEP_ATTN_KERNEL_ACCELERATOR",
    "special_tokens_id",
    "BiPE_seps",
    "tokenizer_type",
    "save",
    "load",
}
READ = {
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "seq_length",
    "max_position_embeddings",
    "pos_emb",
    "rotary_pct",
    "rotary_emb_base",
    "no_weight_tying",
    "gpt_j_residual",
    "norm",
    "activation",
    "layernorm_epsilon",
    "rms_norm_epsilon",
    "num_kv_heads",
    "intermediate_size",
    "hidden_dropout",
    "attention_dropout",
    "attention_config",
    "model_parallel_size",
    "pipe_parallel_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "optimizer",
    "min_lr",
    "lr_decay_style",
    "lr_decay_iters",
    "warmup",
    "weight_decay",
    "gradient_clipping",
    "train_iters",
    "eval_interval",
    "eval_iters",
    "seed",
    "checkpoint_activations",
    "checkpoint_factor",
    "log_interval",
    "data_path",
    "split",
    "train_data_paths",
    "train_data_weights",
    "valid_data_paths",
    "test_data_paths",
    "vocab_file",
    "merge_file",
    "fp16",
    "bf16",
    "precision",
    "zero_optimization",
    "make_vocab_size_divisible_by",
    # SepLLM's NeoX fork
    "separator_token_ids",
    "init_tok_max_idx",
    "prefill_local_window_size",
    "prefill_loc_win_size_list",
    "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS",
    "generate_local_window_size",
    "generate_win_loc_size_list",
    "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS",
    "USE_ORIGINAL_FULL_ATTEN",
    "streamingLLM",
    "USE_BiPE",
    "PRINT_KV_RATIO",
    "print_ratio_intervals",
}


def _sparse(config) -> list[str]:
    kinds = {k for entry in (config or []) for k in entry[0]}
    return sorted(kinds - {"global", "flash"})


def read_neox_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConversionError(f"{path} is not text. Fix: pass the GPT-NeoX .yml") from None
    except yaml.YAMLError as e:
        raise ConversionError(
            f"{path} is not valid YAML ({yaml_problem(e)}). Fix: pass a GPT-NeoX config file"
        ) from None
    if not isinstance(raw, dict):
        raise ConversionError(
            f"{path} does not hold a mapping of GPT-NeoX arguments. Fix: pass a NeoX .yml"
        )
    # NeoX accepts dashes and underscores alike (SepLLM's flags keep their capitals), and older spellings
    out = {k.replace("-", "_"): v for k, v in raw.items()}
    for old, new in (
        ("gas", "gradient_accumulation_steps"),
        ("save_interval", "checkpoint_factor"),
        ("attention_configs", "attention_config"),
    ):
        if old in out:
            out.setdefault(new, out.pop(old))
    return out


def neox_to_raw(n: dict, gpus: int | None, run_dir: str) -> tuple[dict, list[str]]:
    """(our raw config mapping, notes on what changed meaning). Raises on options we cannot serve."""
    for key, bad in UNSUPPORTED.items():
        # NeoX's default: learned
        reason = bad(n[key]) if key in n else (key == "pos_emb" and bad("learned"))
        if reason:
            raise ConversionError(
                f"the GPT-NeoX option {key} cannot be imported: {reason}. Fix: train it with "
                "GPT-NeoX, or change the option"
            )
    notes = []
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if key not in n:
            raise ConversionError(
                f"the GPT-NeoX config lacks {key}. Fix: pass the full model config"
            )
    norm, act = n.get("norm", "layernorm"), n.get("activation", "gelu")
    parallel_residual = n.get("gpt_j_residual", False)
    if norm == "layernorm" and act == "gelu" and parallel_residual:
        family = "neox"
    elif norm == "rmsnorm" and act in ("swiglu", "silu") and not parallel_residual:
        family = "llama"
    else:
        raise ConversionError(
            f"the GPT-NeoX options norm={norm}, activation={act}, gpt_j_residual="
            f"{parallel_residual} cannot be imported: the model families here are LayerNorm + "
            "GeLU + parallel residual (Pythia) and RMSNorm + SwiGLU + sequential residual "
            "(Llama). Fix: use one of those"
        )
    h = n["hidden_size"]
    model = {
        "family": family,
        "num_layers": n["num_layers"],
        "hidden_size": h,
        "num_heads": n["num_attention_heads"],
        "max_position_embeddings": n.get("max_position_embeddings", n["seq_length"]),
        "rotary_pct": float(n.get("rotary_pct", 1.0)),
        "rotary_base": float(n.get("rotary_emb_base", 10000)),
        "tie_embeddings": not n.get("no_weight_tying", False),
        "hidden_dropout": float(n.get("hidden_dropout", 0.0)),
        "attention_dropout": float(n.get("attention_dropout", 0.0)),
    }
    ffn = n.get("intermediate_size") or (4 * h if family == "neox" else None)
    if ffn is None:
        raise ConversionError(
            "a SwiGLU GPT-NeoX config without intermediate_size cannot be imported exactly. "
            "Fix: add intermediate_size (the MLP width) to it"
        )
    model["ffn_hidden_size"] = ffn
    eps = n.get("layernorm_epsilon", n.get("rms_norm_epsilon"))
    if eps is not None:
        model["norm_eps"] = float(eps)
    if n.get("num_kv_heads"):
        model["num_kv_heads"] = n["num_kv_heads"]
    tp, pp = n.get("model_parallel_size", 1), max(1, n.get("pipe_parallel_size", 1))
    micro = n.get("train_micro_batch_size_per_gpu", 1)
    if gpus is None:
        gpus = tp * pp
        if "train_batch_size" not in n:
            notes.append(
                "the global batch assumes one data-parallel replica (micro x accumulation); pass --gpus "
                "with the run's GPU count for its real global batch"
            )
    if gpus % (tp * pp) and "train_batch_size" not in n:
        raise ConversionError(
            f"--gpus {gpus} is not a multiple of model-parallel-size x pipe-parallel-size = "
            f"{tp * pp}, so the data-parallel size is unknown. Fix: pass the GPU count of the run"
        )
    dp = max(1, gpus // (tp * pp))
    glob = n.get("train_batch_size") or micro * n.get("gradient_accumulation_steps", 1) * dp
    stage = (n.get("zero_optimization") or {}).get("stage", 0)
    if stage > 1:
        notes.append(
            f"ZeRO stage {stage} becomes parallel.zero: 1 on the native engine (optimizer state sharded; "
            f"gradients and weights are not); with tp = pp = 1, parallel.engine: deepspeed and "
            f"parallel.zero: {stage} give DeepSpeed's ZeRO-{stage}"
        )
    fp16 = (n.get("fp16") or {}).get("enabled", False) or n.get("precision") == "fp16"
    if fp16:
        notes.append(
            "fp16 becomes bf16 autocast (train.precision: auto); fp16 loss scaling is not offered"
        )
    div = n.get("make_vocab_size_divisible_by", 128)
    if div != 128:
        notes.append(f"the vocabulary is padded to a multiple of 128 here, not {div}")
    if n.get("lr_decay_iters", n.get("train_iters")) != n.get("train_iters"):
        notes.append(
            f"lr_decay_iters={n['lr_decay_iters']} differs from train_iters: the schedule here decays "
            "over train.steps"
        )
    opt = (n.get("optimizer") or {}).get("params", {})
    betas = opt.get("betas", [0.9, 0.999])
    optim = {
        "lr": float(opt.get("lr", 1e-3)),
        "min_lr": float(n.get("min_lr", 0.0)),
        "schedule": n.get("lr_decay_style", "linear"),
        "warmup_fraction": float(n.get("warmup", 0.01)),
        "weight_decay": float(n.get("weight_decay", 0.01)),
        "beta1": float(betas[0]),
        "beta2": float(betas[1]),
        "eps": float(opt.get("eps", 1e-8)),
        "clip_grad": float(n.get("gradient_clipping", 1.0)),
    }
    train = {
        "run_dir": run_dir,
        "steps": n.get("train_iters", 1000),
        "micro_batch_size": micro,
        "global_batch_size": glob,
        "eval_interval": n.get("eval_interval", 1000),
        "eval_iters": n.get("eval_iters", 10),
        "seed": n.get("seed", 1234),
    }
    if n.get("checkpoint_activations"):
        train["activation_checkpointing"] = "full"
    data = _neox_data(n, notes)
    raw = {
        "model": model,
        "attention": _sepllm_flags(n, notes),
        "data": data,
        "optim": optim,
        "train": train,
        "parallel": {"tp": tp, "pp": pp, "zero": 1 if stage >= 1 else 0},
        "checkpoint": {"save_interval": n.get("checkpoint_factor", 1000)},
        "logging": {"log_interval": n.get("log_interval", 10)},
    }
    skipped = sorted(set(n) - READ - QUIET)
    if skipped:
        notes.append(f"not read ({len(skipped)}): {', '.join(skipped)}")
    return raw, notes


def _neox_data(n: dict, notes: list[str]) -> dict:
    data = {"seq_len": n["seq_length"]}
    paths = n.get("train_data_paths") or n.get("data_path")
    if paths:
        data["paths"] = [paths] if isinstance(paths, str) else list(paths)
        if n.get("train_data_weights"):
            data["weights"] = [float(w) for w in n["train_data_weights"]]
    if n.get("valid_data_paths") or n.get("test_data_paths"):
        notes.append(
            "valid_data_paths / test_data_paths are not read: validation here is data.split of the "
            "training paths"
        )
        data["split"] = [0.98, 0.02, 0.0]
    if isinstance(n.get("split"), str):
        data["split"] = n["split"]
    elif "split" in n:
        raise ConversionError(
            f"split: {n['split']!r} is not GPT-NeoX's 'train,valid,test' string. Fix: write e.g. "
            "split: '969,30,1'"
        )
    # a tokenizer.json, a sentencepiece .model, or GPT-2's vocab.json (+ merges.txt)
    if n.get("vocab_file"):
        data["tokenizer"] = n["vocab_file"]
        merge = n.get("merge_file")
        if merge and Path(merge).name != "merges.txt":
            notes.append(
                f"merge_file {merge} must lie beside the vocab file as merges.txt to be found"
            )
    return data


def _sepllm_flags(n: dict, notes: list[str]) -> dict:
    """SepLLM's NeoX fork: separator ids, a (per-layer) local window, attention sinks up to an index."""
    if (
        "separator_token_ids" not in n
        and not n.get("USE_ORIGINAL_FULL_ATTEN")
        and not n.get("streamingLLM")
    ):
        return {"kind": "dense"}
    if n.get("USE_ORIGINAL_FULL_ATTEN"):
        return {"kind": "dense"}
    windows = n.get("prefill_local_window_size", 64)
    if n.get("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS"):
        windows = list(n.get("prefill_loc_win_size_list") or [])
    a = {
        "kind": "streamingllm" if n.get("streamingLLM") else "sepllm",
        "window": windows,
        "init_tokens": int(n.get("init_tok_max_idx", 2)) + 1,
    }
    if a["kind"] == "sepllm":
        a["separators"] = [int(i) for i in n.get("separator_token_ids") or [] if i is not None]
    if n.get("PRINT_KV_RATIO"):
        a["stats_interval"] = int(n.get("print_ratio_intervals", 100))
    if any(k in n for k in ("generate_local_window_size", "generate_win_loc_size_list")):
        notes.append(
            "SepLLM's generate_* windows are inference settings: pass them to `megatron-sep eval` / "
            "`generate` (the cache sizes), not to training"
        )
    return a


# ---- checkpoints ------------------------------------------------------------------------------------

COLUMN = (
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "word_embeddings.weight",
    "final_linear.weight",
)
ROW = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
NEW_NAMES = {
    "mlp.linear1.": "mlp.dense_h_to_4h.",
    "mlp.linear2.": "mlp.dense_4h_to_h.",
}  # gpt-neox >= 2.0


def _step_dir(ckpt: Path) -> Path:
    if (ckpt / "latest").is_file():
        from ..checkpoint.files import is_plain_name

        name = (ckpt / "latest").read_bytes().decode("utf-8", "replace").strip()
        if not is_plain_name(name):
            raise ConversionError(
                f"{ckpt / 'latest'} holds {name[:60]!r}, not a folder name beside it (a path is "
                f"never followed out of {ckpt}). Fix: write the global_step* folder's name into it"
            )
        return ckpt / name
    if list(ckpt.glob("layer_*-model_*-model_states.pt")):
        return ckpt
    steps = sorted(ckpt.glob("global_step*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if not steps:
        raise ConversionError(
            f"{ckpt} holds no GPT-NeoX checkpoint (no latest file, global_step* folder or "
            "layer_*-model_*-model_states.pt files). Fix: pass the checkpoint's save folder"
        )
    return steps[-1]


def read_neox_checkpoint(ckpt: Path) -> dict:
    """Merged tensors under transformers' GPT-NeoX names."""
    step = _step_dir(ckpt)
    files: dict[int, dict[int, Path]] = {}
    for f in step.glob("layer_*-model_*-model_states.pt"):
        m = re.match(r"layer_(\d+)-model_(\d+)-model_states\.pt", f.name)
        files.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
    if not files:
        raise ConversionError(
            f"{step} holds no layer_*-model_*-model_states.pt files. Fix: pass a GPT-NeoX "
            "(DeepSpeed pipeline) checkpoint"
        )
    out, blocks = {}, []
    tp = max(len(r) for r in files.values())
    for layer in sorted(files):
        ranks = files[layer]
        if sorted(ranks) != list(range(tp)):
            raise ConversionError(
                f"{step}: layer {layer} has tensor-parallel shards {sorted(ranks)}, not 0..{tp - 1}. "
                "Fix: copy every layer_*-model_* file of the checkpoint"
            )
        shards = [_load(ranks[r]) for r in range(len(ranks))]
        merged = {
            k: _merge(k, [s[k] for s in shards]) for k in shards[0] if not k.endswith("inv_freq")
        }
        if "attention.query_key_value.weight" in merged:
            blocks.append(merged)
        elif "word_embeddings.weight" in merged:
            out.setdefault("gpt_neox.embed_in.weight", merged["word_embeddings.weight"])
        elif "norm.weight" in merged:
            out["gpt_neox.final_layer_norm.weight"] = merged["norm.weight"]
            if "norm.bias" in merged:
                out["gpt_neox.final_layer_norm.bias"] = merged["norm.bias"]
        elif "final_linear.weight" in merged:
            out["embed_out.weight"] = merged["final_linear.weight"]
    for i, block in enumerate(blocks):
        for k, v in block.items():
            out[f"gpt_neox.layers.{i}.{k}"] = v
    out["_num_layers"] = len(blocks)
    return out


def _load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it, no traceback
        raise ConversionError(
            f"{path} cannot be read ({first_line(e)}). Fix: copy the checkpoint again"
        ) from None
    state = state.get("module", state) if isinstance(state, dict) else state
    renamed = {}
    for k, v in state.items():
        for old, new in NEW_NAMES.items():
            k = k.replace(old, new)
        renamed[k] = v
    return renamed


def _merge(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if key in COLUMN:
        return torch.cat(parts, dim=0)
    if key in ROW:
        return torch.cat(parts, dim=1)
    return parts[0]  # replicated: norms, row-parallel biases


def import_neox(
    config: str | Path,
    out: str | Path,
    checkpoint: str | Path | None = None,
    gpus: int | None = None,
    overrides=(),
    force: bool = False,
) -> tuple[Path, list[str]]:
    """Writes out/config.yaml (and out/checkpoints/step_00000000 from a checkpoint). Returns (out, notes)."""
    config, out = Path(config), Path(out)
    if not config.is_file():
        raise ConversionError(f"--config {config} not found. Fix: pass the GPT-NeoX .yml")
    refuse_checkpoint_dir(out)
    if gpus is not None and gpus < 1:
        raise ConversionError(
            f"--gpus {gpus} must be at least 1. Fix: pass the number of GPUs the NeoX run used"
        )
    try:
        raw, notes = neox_to_raw(read_neox_yaml(config), gpus, str(out.absolute()))
    except (TypeError, ValueError, AttributeError, IndexError, KeyError) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(
            f"{config} holds a value of an unexpected type ({type(e).__name__}: {first_line(e)}). "
            "Fix: write it as GPT-NeoX documents it (numbers as numbers, optimizer and "
            "zero_optimization as mappings, paths as strings or lists)"
        ) from None
    state = None
    if checkpoint is not None:
        state = read_neox_checkpoint(Path(checkpoint))
    vocab = _vocab_size(raw, state, notes)
    if vocab is not None:
        raw["model"]["vocab_size"] = vocab
    try:
        cfg = config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConversionError(
            f"the imported config does not load ({e}). Fix: correct the NeoX option, or pass "
            "--set to override it"
        ) from None
    if state is not None:
        layers = state.pop("_num_layers")
        if layers != cfg.model.num_layers:
            raise ConversionError(
                f"the checkpoint {checkpoint} holds {layers} transformer layers, its config "
                f"{cfg.model.num_layers}. Fix: pass the config the checkpoint was trained with"
            )
        emb = state.get("gpt_neox.embed_in.weight")
        for name in ("gpt_neox.embed_in.weight", "embed_out.weight"):
            if name in state:
                state[name] = state[name][:vocab]  # NeoX's own vocabulary padding
        if emb is not None and emb.shape[0] < vocab:
            raise ConversionError(
                f"the checkpoint's embedding has {emb.shape[0]} rows for a vocabulary of {vocab}. "
                "Fix: pass the tokenizer (vocab_file) the model was trained with"
            )
        if cfg.model.family != "neox":
            raise ConversionError(
                "only GPT-NeoX (Pythia-shape) checkpoints import; this config is Llama-shaped. "
                "Fix: convert it to Hugging Face with GPT-NeoX's tools, then use import-hf"
            )
        ours = from_hf_state(state, cfg, padded_vocab(vocab))
        save_imported(
            cfg,
            ours,
            out,
            force,
            str(checkpoint),
            f"the config {config.name}",
            owned=("config.yaml",),
        )
    else:
        prepare_out(out, force, ("config.yaml",), "write config.yaml beside the other files")
    (out / "config.yaml").write_text(dump_config(cfg))
    return out, notes


def _vocab_size(raw: dict, state: dict | None, notes: list[str]) -> int | None:
    """The tokenizer's vocabulary; else the checkpoint's (padded) embedding rows; else left to training."""
    tok = raw["data"].get("tokenizer")
    if tok:
        try:
            return load_tokenizer(tok).vocab_size
        except TokenizerError as e:
            notes.append(f"the tokenizer {tok} does not load here ({str(e).split('. Fix:')[0]})")
    if state is not None and "gpt_neox.embed_in.weight" in state:
        rows = state["gpt_neox.embed_in.weight"].shape[0]
        notes.append(
            f"model.vocab_size is the checkpoint's {rows} embedding rows (padding included)"
        )
        return rows
    notes.append("model.vocab_size is left to training, which takes it from data.tokenizer")
    return None
