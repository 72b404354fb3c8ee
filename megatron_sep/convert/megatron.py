"""`import-megatron`: Megatron-LM / Megatron-Core GPT checkpoints -> a project checkpoint.

Two layouts, both of Megatron-Core models (Megatron-LM's default since 2024):
- `torch_dist` (`--ckpt-format torch_dist`): an iteration folder of PyTorch distributed-checkpoint files
  holding global tensors, the layers stacked on a leading axis; the run's arguments are in `common.pt`.
- legacy torch files: `iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt`, one per tensor (and pipeline) rank,
  each with the rank's shards and the run's `args`. Shards are merged: qkv and the embedding on dim 0,
  the attention projection and fc2 on dim 1, and SwiGLU's fc1, which each rank holds as
  [its gate rows; its up rows], split in two before the halves are joined.
The fused qkv groups rows per query group as [q_0 .. q_{g-1}, k, v], which is our own layout, so it maps
as is. Only the Llama shape imports (RMSNorm, SwiGLU, RoPE, no biases); the error names what differs.
The shape comes from the run's args; a checkpoint saved by megatron-core's `dist_checkpointing` outside
Megatron-LM's training loop has none, and then it comes from the tensors' shapes plus the head count (and
what the tensors cannot say) from the user.
"""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, config_from_dict, dump_config
from ..config.load import read_config_file
from ..data.tokenizer import first_line
from ..model.gpt import padded_vocab
from .hf import ConversionError
from .output import refuse_checkpoint_dir, save_imported

LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
# Megatron-Core names (local and Transformer Engine specs) -> our per-layer names
NAMES = {
    "input_layernorm.weight": "norm1.weight",
    "self_attention.linear_qkv.layer_norm_weight": "norm1.weight",
    "pre_mlp_layernorm.weight": "norm2.weight",
    "mlp.linear_fc1.layer_norm_weight": "norm2.weight",
    "self_attention.linear_qkv.weight": "attn.qkv.weight",
    "self_attention.linear_proj.weight": "attn.out.weight",
    "mlp.linear_fc1.weight": "fc1",
    "mlp.linear_fc2.weight": "mlp.down.weight",
}
COLUMN, ROW = (
    ("attn.qkv.weight", "embed.weight", "lm_head.weight"),
    ("attn.out.weight", "mlp.down.weight"),
)


def _iteration_dir(ckpt: Path) -> Path:
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        it = tracker.read_text(errors="replace").strip()
        if it != "release" and not it.isdigit():
            raise ConversionError(
                f"{tracker} holds {it[:40]!r}, not an iteration number. Fix: write the number of "
                "the iter_* folder to import into it, or pass that folder"
            )
        return ckpt / ("release" if it == "release" else f"iter_{int(it):07d}")
    if (ckpt / ".metadata").is_file() or list(ckpt.glob("mp_rank_*")):
        return ckpt
    raise ConversionError(
        f"{ckpt} is not a Megatron checkpoint (no latest_checkpointed_iteration.txt, .metadata "
        "or mp_rank_* folders). Fix: pass the --save folder or one iter_* folder in it"
    )


class _StandIn:
    """Built in place of a class a Megatron file names beside its tensors (its enums, numpy's RNG state):
    it keeps the arguments, and none of the named code runs. The import reads only numbers and strings."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _torch_load(path: Path) -> dict:
    """Megatron stores its argparse Namespace (with its own enums) beside the tensors. The file is read by
    torch's weights-only unpickler with an inert stand-in for each such class; the modules that weights-only
    loading blocks (os, subprocess, ...) stay refused, so no code from the file runs."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        allowed = [
            argparse.Namespace
            if n == "argparse.Namespace"
            else (type(n.rsplit(".", 1)[-1], (_StandIn,), {"__module__": "stand_in"}), n)
            for n in names
        ]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(
            f"{path} cannot be read ({first_line(e).split('. In PyTorch 2.6')[0]}). Fix: copy "
            "the checkpoint again; a file that names code to run (os, subprocess, ...) is never "
            "loaded"
        ) from None


def read_torch_dist(step: Path) -> tuple[dict, object]:
    """(full tensors by Megatron-Core's key, the run's args)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    # DCP's index through an allow-list, as for our checkpoints
    from ..checkpoint.files import SafeReader

    reader = SafeReader(str(step))
    try:
        meta = reader.read_metadata()
        state = {
            k: torch.empty(v.size, dtype=v.properties.dtype)
            for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and "_extra_state" not in k
        }
        with warnings.catch_warnings():  # a single-process load is intended
            warnings.simplefilter("ignore")
            load(state, storage_reader=reader)
    except Exception as e:  # a damaged .metadata or .distcp file: name it, no traceback
        raise ConversionError(
            f"the torch_dist checkpoint {step} cannot be read ({first_line(e)}). Fix: copy "
            "its .metadata and every .distcp file again"
        ) from None
    common = _torch_load(step / "common.pt") if (step / "common.pt").is_file() else {}
    out = {}
    for k, v in state.items():
        if k.startswith("decoder.layers."):  # stacked: [layers, ...]
            rest = k[len("decoder.layers.") :]
            for i, t in enumerate(v.unbind(0)):
                out[f"decoder.layers.{i}.{rest}"] = t
        else:
            out[k] = v
    return out, common.get("args")


def read_legacy(step: Path) -> tuple[dict, object]:
    """Rank files merged into full tensors (our names for layer tensors), and the run's args."""
    ranks = {}
    for d in step.glob("mp_rank_*"):
        m = re.fullmatch(r"mp_rank_(\d+)(?:_(\d+))?", d.name)
        if m and (d / "model_optim_rng.pt").is_file():
            ranks[(int(m.group(2) or 0), int(m.group(1)))] = d / "model_optim_rng.pt"
    if not ranks:
        raise ConversionError(
            f"{step} holds no mp_rank_*/model_optim_rng.pt. Fix: pass a Megatron checkpoint"
        )
    pp = 1 + max(p for p, _ in ranks)
    tp = 1 + max(t for _, t in ranks)
    if sorted(ranks) != [(p, t) for p in range(pp) for t in range(tp)]:
        raise ConversionError(
            f"{step}: rank folders {sorted(ranks)} miss some (pipeline, tensor) pairs. Fix: copy "
            "every mp_rank_* folder"
        )
    out, args, offset = {}, None, 0
    for p in range(pp):
        loaded = [_torch_load(ranks[(p, t)]) for t in range(tp)]
        # Megatron saves a dict {"model": {name: tensor}, "args": ...}
        for t, x in enumerate(loaded):
            what = x.get("model") if isinstance(x, dict) else x
            if not isinstance(what, dict) and what is not None:
                where = "its 'model' entry" if isinstance(x, dict) else "it"
                raise ConversionError(
                    f"{ranks[(p, t)]} is not a Megatron checkpoint: {where} holds a "
                    f"{type(what).__name__}, not a mapping of tensor names to tensors. Fix: pass "
                    "the model_optim_rng.pt files Megatron-LM's training loop saved"
                )
        args = args or loaded[0].get("args")
        shards = [x.get("model") for x in loaded]
        if any(s is None for s in shards) or "language_model" in shards[0]:
            raise ConversionError(
                f"{ranks[(p, 0)]} is not a Megatron-Core model state (legacy language_model "
                "layout). Fix: convert it with Megatron-LM's tools/checkpoint/convert.py "
                "--saver mcore first"
            )
        layers = 0
        for key in shards[0]:
            if "_extra_state" in key:
                continue
            parts = [s.get(key) for s in shards]
            bad = next((t for t, x in enumerate(parts) if not isinstance(x, torch.Tensor)), None)
            if bad is not None:
                got = "nothing" if parts[bad] is None else f"a {type(parts[bad]).__name__}"
                raise ConversionError(
                    f"{ranks[(p, bad)]} holds {got} for {key}, not a tensor (a damaged file, or "
                    "rank files of two checkpoints). Fix: copy every mp_rank_* folder of one "
                    "checkpoint again"
                )
            m = LAYER.fullmatch(key)
            if m:
                i, name = int(m.group(1)), NAMES.get(m.group(2), m.group(2))
                layers = max(layers, i + 1)
                out[f"decoder.layers.{i + offset}.{name}"] = _merge(name, parts)
            else:
                out[key] = _merge(
                    {
                        "embedding.word_embeddings.weight": "embed.weight",
                        "output_layer.weight": "lm_head.weight",
                    }.get(key, key),
                    parts,
                )
        offset += layers
    return out, args


def _merge(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if name == "fc1":  # each rank: [gate_r; up_r] -> [gate; up]
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if name in COLUMN:
        return torch.cat(parts, dim=0)
    if name in ROW:
        return torch.cat(parts, dim=1)
    return parts[0]  # replicated: norms


def config_from_args(args, vocab: int, seq_len: int | None) -> dict:
    """Our raw config from Megatron's argparse args (the Llama shape only)."""
    if args is None:
        raise ConversionError(
            "the checkpoint holds no Megatron args (common.pt / model_optim_rng.pt 'args'), so "
            "its shape is unknown. Fix: pass a checkpoint saved by Megatron-LM's training loop"
        )
    a = args if isinstance(args, dict) else getattr(args, "__dict__", None)
    if not isinstance(a, dict):
        raise ConversionError(
            f"the checkpoint's Megatron args are a {type(args).__name__}, not an argparse "
            "Namespace. Fix: pass a checkpoint saved by Megatron-LM's training loop"
        )
    norm, swiglu = a.get("normalization", "LayerNorm"), a.get("swiglu", False)
    pos, bias = a.get("position_embedding_type", "learned_absolute"), a.get("add_bias_linear", True)
    if norm != "RMSNorm" or not swiglu or pos != "rope" or bias or a.get("add_qkv_bias", False):
        raise ConversionError(
            f"Megatron options normalization={norm}, swiglu={swiglu}, position_embedding_type="
            f"{pos}, add_bias_linear={bias} cannot be imported: only the Llama shape (RMSNorm, "
            "SwiGLU, rope, no biases) maps onto a model here. Fix: import a Llama-shaped model"
        )
    heads = a["num_attention_heads"]
    model = {
        "family": "llama",
        "num_layers": a["num_layers"],
        "hidden_size": a["hidden_size"],
        "num_heads": heads,
        "num_kv_heads": a.get("num_query_groups") if a.get("group_query_attention") else heads,
        "ffn_hidden_size": a.get("ffn_hidden_size") or 4 * a["hidden_size"],
        "vocab_size": vocab,
        "max_position_embeddings": a.get("max_position_embeddings") or a.get("seq_length"),
        "rotary_pct": float(a.get("rotary_percent", 1.0)),
        "rotary_base": float(a.get("rotary_base", 10000)),
        "norm_eps": float(a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))),
        "tie_embeddings": not a.get("untie_embeddings_and_output_weights", False),
    }
    return {
        "model": model,
        "attention": {"kind": "dense"},
        "data": {"seq_len": seq_len or a.get("seq_length")},
        "parallel": {
            "tp": a.get("tensor_model_parallel_size", 1),
            "pp": a.get("pipeline_model_parallel_size", 1),
        },
    }


# the tensors hold these; the others come from --config / --set, or the defaults (noted)
SHAPE = ("family", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size")
UNSEEN = ("rotary_base", "rotary_pct", "norm_eps", "max_position_embeddings")
KNOWN = {
    "embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
}


def config_from_tensors(t: dict, heads: int | None, given: dict, overrides, notes: list) -> dict:
    """Our raw model section from the tensors' shapes (the Llama shape only). The head count is not in
    them: it comes from --num-heads or --config's model.num_heads."""
    heads = heads or given.get("num_heads")
    if not heads:
        raise ConversionError(
            "the checkpoint holds no Megatron args (common.pt / model_optim_rng.pt 'args'), and "
            "the head count is not in its tensors' shapes. Fix: pass --num-heads (or --config with "
            "a model section)"
        )
    per_layer = {m.group(2) for k in t if (m := LAYER.fullmatch(k))} - set(NAMES.values())
    top = {k for k in t if not LAYER.fullmatch(k)} - KNOWN
    odd = sorted(top | {f"decoder.layers.*.{n}" for n in per_layer})
    if odd:
        raise ConversionError(
            f"the checkpoint holds {', '.join(odd[:4])}, which the Llama shape (RMSNorm, SwiGLU, "
            "RoPE, no biases) has not. Fix: import a Llama-shaped model"
        )
    rows, h = t["embedding.word_embeddings.weight"].shape
    if h % heads:
        raise ConversionError(
            f"--num-heads {heads} does not divide the hidden size {h} (the embedding's width). "
            "Fix: pass the run's head count"
        )
    first, hd = "decoder.layers.0.", h // heads
    missing = [n for n in ("attn.qkv.weight", "fc1", "mlp.down.weight") if first + n not in t]
    if missing:
        raise ConversionError(
            f"the checkpoint lacks layer 0's {', '.join(missing)}. Fix: pass the complete checkpoint"
        )
    qkv = t[first + "attn.qkv.weight"].shape[0]  # (heads + 2 groups) x head width
    groups = (qkv // hd - heads) // 2
    if qkv != (heads + 2 * groups) * hd or groups < 1 or heads % groups:
        raise ConversionError(
            f"the qkv weight's {qkv} rows are no [q, k, v] layout of {heads} heads of width {hd}. "
            "Fix: pass the run's head count with --num-heads"
        )
    ffn = t[first + "mlp.down.weight"].shape[1]
    if t[first + "fc1"].shape[0] != 2 * ffn:
        raise ConversionError(
            f"linear_fc1 has {t[first + 'fc1'].shape[0]} rows for an MLP width of {ffn}, not the "
            "gate and up rows of SwiGLU. Fix: import a Llama-shaped model"
        )
    layers = 1 + max(int(LAYER.fullmatch(k).group(1)) for k in t if LAYER.fullmatch(k))
    shape = dict(zip(SHAPE, ("llama", layers, h, heads, groups, ffn)))
    for key, value in shape.items():
        if given.get(key, value) != value:
            raise ConversionError(
                f"--config says model.{key}={given[key]!r}, the checkpoint's tensors {value!r}. "
                "Fix: correct the config, or leave the key out"
            )
    model = {**given, **shape, "tie_embeddings": "output_layer.weight" not in t}
    if "vocab_size" not in given:
        model["vocab_size"] = rows
        notes.append(
            f"model.vocab_size is the embedding's {rows} rows (Megatron pads the vocabulary): "
            "--set model.vocab_size=N gives the tokenizer's"
        )
    unseen = [
        f"{k}={getattr(ModelConfig, k)}"
        for k in UNSEEN
        if k not in given and not any(o.startswith(f"model.{k}=") for o in overrides)
    ]
    if unseen:
        notes.append(
            f"the checkpoint holds no Megatron args: {', '.join(unseen)} are this project's "
            "defaults, not read from it; pass --config with a model section (or --set) if the run "
            "used others"
        )
    return {"model": model}


def import_megatron(
    checkpoint: str | Path,
    out: str | Path,
    overrides=(),
    force: bool = False,
    config: str | Path | None = None,
    num_heads: int | None = None,
) -> tuple[Path, list[str]]:
    """Writes out/checkpoints/step_00000000 and out/config.yaml (its train.run_dir is out, so training with it
    starts from these weights). `config`: a project config for the other sections, and the model's shape
    where the checkpoint holds no args. Returns (out, notes)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise ConversionError(
            f"--checkpoint {checkpoint} is not a folder. Fix: pass Megatron's --save folder"
        )
    refuse_checkpoint_dir(out)
    step = _iteration_dir(checkpoint)
    if not step.is_dir():
        raise ConversionError(
            f"{step} (named by latest_checkpointed_iteration.txt) is missing. Fix: copy it"
        )
    if (step / ".metadata").is_file():
        tensors, args = read_torch_dist(step)
        tensors = {_our_layer_name(k): v for k, v in tensors.items()}
    else:
        tensors, args = read_legacy(step)  # already merged under our layer names
    embed = tensors.get("embedding.word_embeddings.weight")
    if embed is None:
        raise ConversionError(
            f"{step} holds no embedding.word_embeddings.weight. Fix: pass a GPT checkpoint"
        )
    notes, base = [], (read_config_file(config) if config is not None else {})
    if args is None:
        raw = config_from_tensors(tensors, num_heads, base.get("model") or {}, overrides, notes)
    else:
        vocab = getattr(args, "vocab_size", None) or embed.shape[0]
        raw = config_from_args(args, int(vocab), None)
        if num_heads not in (None, raw["model"]["num_heads"]):
            raise ConversionError(
                f"--num-heads {num_heads} differs from the checkpoint's args "
                f"({raw['model']['num_heads']}). Fix: leave --num-heads out"
            )
        if base:  # the user's config decides what the run does; the model is the checkpoint's
            raw = {"model": raw["model"]}
    for section, values in raw.items():
        base[section] = {**(base.get(section) or {}), **values}
    raw = base
    raw.setdefault("train", {})["run_dir"] = str(out.absolute())
    try:
        cfg = config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConversionError(
            f"the imported config does not load ({e}). Fix: pass --set to override it"
        ) from None
    state = _our_state(tensors, cfg)
    what = "its Megatron args" if args is not None else "the shape from --num-heads and its tensors"
    save_imported(cfg, state, out, force, str(step), what, owned=("config.yaml",))
    (out / "config.yaml").write_text(dump_config(cfg))
    return out, notes


def _our_layer_name(key: str) -> str:
    m = LAYER.fullmatch(key)
    return f"decoder.layers.{m.group(1)}.{NAMES.get(m.group(2), m.group(2))}" if m else key


def _our_state(t: dict, cfg) -> dict:
    m, V = cfg.model, cfg.model.vocab_size
    rows = padded_vocab(V)

    def vocab_rows(x):
        x = x[:V]
        return torch.cat([x, x.new_zeros(rows - V, x.shape[1])]) if rows > V else x

    out = {
        "embed.weight": vocab_rows(t["embedding.word_embeddings.weight"]),
        "final_norm.weight": t.get("decoder.final_layernorm.weight"),
    }
    out["lm_head.weight"] = (
        out["embed.weight"] if m.tie_embeddings else vocab_rows(t["output_layer.weight"])
    )
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        missing = [
            n
            for n in (
                "norm1.weight",
                "norm2.weight",
                "attn.qkv.weight",
                "attn.out.weight",
                "fc1",
                "mlp.down.weight",
            )
            if p + n not in t
        ]
        if missing:
            raise ConversionError(
                f"the checkpoint lacks layer {i}'s {', '.join(missing)}: its args say "
                f"{m.num_layers} layers. Fix: pass the complete checkpoint"
            )
        gate, up = t[p + "fc1"].chunk(2, dim=0)
        out.update(
            {
                f"layers.{i}.{n}": t[p + n]
                for n in (
                    "norm1.weight",
                    "norm2.weight",
                    "attn.qkv.weight",
                    "attn.out.weight",
                    "mlp.down.weight",
                )
            }
        )
        out[f"layers.{i}.mlp.gate.weight"], out[f"layers.{i}.mlp.up.weight"] = gate, up
    return out
