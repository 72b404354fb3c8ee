"""`import-neox`: a GPT-NeoX YAML config (with SepLLM's own NeoX flags) -> our config, and a GPT-NeoX /
DeepSpeed pipeline checkpoint (any tensor-parallel degree; read by neox_checkpoint.py) -> a project
checkpoint, through the same map as `import-hf`. Every NeoX key is read, refused, or named in a note,
except the few in QUIET that change nothing here.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import ConfigError, config_from_dict, dump_config
from ..config.load import yaml_problem
from ..data.tokenizer import TokenizerError, first_line, load_tokenizer
from ..model.gpt import padded_vocab
from ..outdir import prepare_out
from .hf import ConversionError, from_hf_state
from .neox_checkpoint import read_neox_checkpoint
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
# nothing to set here: launcher, kernel fusions, memory savers, DeepSpeed's logging cadence. Every other key
# is read, or named in a note (NOT_MAPPED, or "not read")
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
    "checkpoint_num_layers",
    "partition_activations",
    "synchronize_each_layer",
    "steps_per_print",
    "wall_clock_breakdown",
    "world_size",
    "num_gpus",
    "global_num_gpus",
    "USE_SEP_ATTN_KERNEL_ACCELERATOR",
    "BiPE_seps",
    "tokenizer_type",
}
# read, but nothing here takes them: the note says why
NOT_MAPPED = {
    "wandb_group": "W&B runs here are named by logging.wandb_project (and WANDB_* variables)",
    "wandb_team": "W&B runs here are named by logging.wandb_project (and WANDB_* variables)",
    "wandb_host": "W&B's host comes from WANDB_BASE_URL here",
    "PADDING_ID": "training batches here are packed, without padding",
    "BATCH_ADAPTIVE_INIT_POS": "training batches here are packed, without padding",
    "special_tokens_id": "separators are attention.separators; the eod id comes from the tokenizer",
}
READ = {
    *NOT_MAPPED,
    "init_method",
    "output_layer_init_method",
    "init_method_std",
    "keep_last_n_checkpoints",
    "extra_save_iters",
    "use_wandb",
    "wandb_project",
    "tensorboard_dir",
    "log_dir",
    "save",
    "load",
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
        "attention": _sepllm_flags(n, notes, max(1, glob // (micro * dp))),
        "data": data,
        "optim": optim,
        "train": train,
        "parallel": {"tp": tp, "pp": pp, "zero": 1 if stage >= 1 else 0},
        "checkpoint": _neox_checkpoint(n, notes),
        "logging": _neox_logging(n, run_dir, notes),
    }
    # NeoX's defaults: normal + scaled_normal (Pythia sets small_init + wang_init)
    init = (n.get("init_method", "normal"), n.get("output_layer_init_method", "scaled_normal"))
    ours = {
        ("small_init", "wang_init"): "neox",
        ("normal", "scaled_normal"): "scaled_normal",
        ("normal", "normal"): "normal",
    }
    if init in ours:
        model["init_method"] = ours[init]
    else:
        notes.append(
            f"init_method={init[0]}, output_layer_init_method={init[1]} are not offered: "
            f"model.init_method is auto ({family}'s); neox (small_init + wang_init), scaled_normal "
            "and normal are offered"
        )
    if "init_method_std" in n:
        model["init_std"] = float(n["init_method_std"])
    notes += [f"{k} is not mapped: {why}" for k, why in NOT_MAPPED.items() if k in n]
    skipped = sorted(set(n) - READ - QUIET)
    if skipped:
        notes.append(f"not read ({len(skipped)}): {', '.join(skipped)}")
    return raw, notes


def _neox_checkpoint(n: dict, notes: list[str]) -> dict:
    out = {"save_interval": n.get("checkpoint_factor", 1000)}
    if n.get("keep_last_n_checkpoints"):
        out["keep_last"] = int(n["keep_last_n_checkpoints"])
    else:  # NeoX's default keeps them all
        notes.append(
            "GPT-NeoX keeps every checkpoint; here the newest checkpoint.keep_last (2) are kept, and "
            "the steps in checkpoint.extra_save_steps: raise keep_last to keep more"
        )
    if n.get("extra_save_iters"):
        out["extra_save_steps"] = sorted({int(s) for s in n["extra_save_iters"]})
    for key in ("save", "load"):
        if n.get(key):
            notes.append(
                f"{key}: {n[key]} is not used: checkpoints go to train.run_dir/checkpoints; "
                "--checkpoint imports NeoX's weights"
            )
    return out


def _neox_logging(n: dict, run_dir: str, notes: list[str]) -> dict:
    out = {"log_interval": n.get("log_interval", 10), "wandb": bool(n.get("use_wandb", False))}
    if n.get("wandb_project"):
        out["wandb_project"] = str(n["wandb_project"])
    if n.get("tensorboard_dir"):
        out["tensorboard"] = True
        notes.append(
            f"tensorboard_dir: {n['tensorboard_dir']} becomes logging.tensorboard: true; the "
            f"TensorBoard logs go to {run_dir}/tensorboard"
        )
    if n.get("log_dir"):
        notes.append(
            f"log_dir: {n['log_dir']} is not used: the step log and metrics.jsonl go to {run_dir}"
        )
    return out


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


def _sepllm_flags(n: dict, notes: list[str], accumulation: int) -> dict:
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
        # SepLLM's NeoX counts forward passes (micro-batches); stats_interval counts optimizer steps
        every = int(n.get("print_ratio_intervals", 100))
        a["stats_interval"] = max(1, round(every / accumulation))
        if accumulation > 1:
            notes.append(
                f"print_ratio_intervals={every} counts forward passes; attention.stats_interval counts "
                f"steps of {accumulation} micro-batches: {a['stats_interval']}"
            )
    if any(k in n for k in ("generate_local_window_size", "generate_win_loc_size_list")):
        notes.append(
            "SepLLM's generate_* windows are inference settings: pass them to `megatron-sep eval` / "
            "`generate` (the cache sizes), not to training"
        )
    return a


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
