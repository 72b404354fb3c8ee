"""Hugging Face conversion: project checkpoints <-> transformers GPT-NeoX / Llama directories.

Weight names map one to one except the fused qkv: ours groups rows per kv head as
[q_0 .. q_{g-1}, k, v]; GPT-NeoX's per-head [q, k, v] is the same layout with g = 1,
Llama splits it into q_proj / k_proj / v_proj. Only the real vocabulary rows are
exported (the padding to a multiple of 128 is ours).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..config import Config, config_from_dict
from ..errors import ConversionError

NEOX_LAYER = {
    "norm1": "input_layernorm",
    "norm2": "post_attention_layernorm",
    "attn.qkv": "attention.query_key_value",
    "attn.out": "attention.dense",
    "mlp.up": "mlp.dense_h_to_4h",
    "mlp.down": "mlp.dense_4h_to_h",
}
LLAMA_LAYER = {
    "norm1": "input_layernorm",
    "norm2": "post_attention_layernorm",
    "attn.out": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}


def hf_config(cfg: Config, eod_id: int | None, pad_id: int | None) -> dict:
    # rope settings under both names: `rope_parameters` (transformers 5), flat keys (4.x)
    m = cfg.model
    common = {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "intermediate_size": m.ffn_size,
        "max_position_embeddings": m.max_position_embeddings,
        "tie_word_embeddings": m.tie_embeddings,
        "eos_token_id": eod_id,
        "bos_token_id": eod_id,
        "pad_token_id": pad_id,
        "attention_dropout": m.attention_dropout,
        "torch_dtype": "float32",
    }
    if m.family == "neox":
        return {
            **common,
            "model_type": "gpt_neox",
            "architectures": ["GPTNeoXForCausalLM"],
            "hidden_act": "gelu",
            "layer_norm_eps": m.norm_eps,
            "use_parallel_residual": True,
            "attention_bias": True,
            "hidden_dropout": m.hidden_dropout,
            "rotary_pct": m.rotary_pct,
            "rotary_emb_base": m.rotary_base,
            "partial_rotary_factor": m.rotary_pct,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": m.rotary_base,
                "partial_rotary_factor": m.rotary_pct,
            },
        }
    return {
        **common,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "num_key_value_heads": m.kv_heads,
        "rms_norm_eps": m.norm_eps,
        "attention_bias": False,
        "mlp_bias": False,
        "head_dim": m.head_dim,
        "rope_theta": m.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rotary_base},
    }


def _prefix(cfg: Config) -> str:
    return "gpt_neox" if cfg.model.family == "neox" else "model"


def _renamed(cfg: Config) -> list[tuple[str, str]]:
    """(our name, transformers name) for every tensor that only changes name."""
    m, root = cfg.model, _prefix(cfg)
    neox = m.family == "neox"
    kinds = ("weight", "bias") if neox else ("weight",)
    table = NEOX_LAYER if neox else LLAMA_LAYER
    pairs = [
        (f"final_norm.{k}", f"{root}.{'final_layer_norm' if neox else 'norm'}.{k}") for k in kinds
    ]
    for i in range(m.num_layers):
        pairs += [
            (f"layers.{i}.{a}.{k}", f"{root}.layers.{i}.{b}.{k}")
            for a, b in table.items()
            for k in kinds
        ]
    return pairs


def _embed_name(cfg: Config) -> str:
    return f"{_prefix(cfg)}.{'embed_in' if cfg.model.family == 'neox' else 'embed_tokens'}.weight"


def to_hf_state(state: dict, cfg: Config) -> dict:
    """Our plain-model state dict -> transformers names (tensors shared, not copied)."""
    m, V = cfg.model, cfg.model.vocab_size
    out = {theirs: state[ours] for ours, theirs in _renamed(cfg)}
    out[_embed_name(cfg)] = state["embed.weight"][:V]
    if not m.tie_embeddings:
        out["embed_out.weight" if m.family == "neox" else "lm_head.weight"] = state[
            "lm_head.weight"
        ][:V]
    if m.family == "llama":  # split our grouped qkv into q_proj / k_proj / v_proj
        g, d, kv = m.num_heads // m.kv_heads, m.head_dim, m.kv_heads
        for i in range(m.num_layers):
            qkv = state[f"layers.{i}.attn.qkv.weight"].view(kv, g + 2, d, m.hidden_size)
            theirs = f"model.layers.{i}.self_attn."
            out[theirs + "q_proj.weight"] = qkv[:, :g].reshape(kv * g * d, -1)
            out[theirs + "k_proj.weight"] = qkv[:, g].reshape(kv * d, -1)
            out[theirs + "v_proj.weight"] = qkv[:, g + 1].reshape(kv * d, -1)
    return out


def from_hf_state(hf: dict, cfg: Config, padded_vocab: int) -> dict:
    """transformers names -> our plain-model state dict (vocabulary rows zero-padded)."""
    m, V = cfg.model, cfg.model.vocab_size

    def pad(t):
        return torch.cat([t, t.new_zeros(padded_vocab - V, t.shape[1])]) if padded_vocab > V else t

    def take(name):
        if name not in hf:
            raise ConversionError(
                f"the Hugging Face weights lack {name}. Fix: check that the directory holds "
                "every shard and that config.json matches the weights"
            )
        return hf[name]

    out = {ours: take(theirs) for ours, theirs in _renamed(cfg)}
    out["embed.weight"] = pad(take(_embed_name(cfg)))
    head = (
        "embed_out.weight" if m.family == "neox" and "embed_out.weight" in hf else "lm_head.weight"
    )
    out["lm_head.weight"] = out["embed.weight"] if m.tie_embeddings else pad(take(head))
    if m.family == "llama":  # q_proj / k_proj / v_proj -> our qkv, grouped per kv head
        g, d, kv = m.num_heads // m.kv_heads, m.head_dim, m.kv_heads
        for i in range(m.num_layers):
            theirs = f"model.layers.{i}.self_attn."
            q = take(theirs + "q_proj.weight").view(kv, g, d, -1)
            k = take(theirs + "k_proj.weight").view(kv, 1, d, -1)
            v = take(theirs + "v_proj.weight").view(kv, 1, d, -1)
            out[f"layers.{i}.attn.qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(
                -1, m.hidden_size
            )
    return out


def config_from_hf(hf: dict, overrides=()) -> Config:
    """Our Config for a transformers config.json (GPT-NeoX or Llama)."""
    kind = hf.get("model_type", "")
    kind = kind[len("sepllm_") :] if kind.startswith("sepllm_") else kind  # our remote-code export
    if kind not in ("gpt_neox", "llama"):
        raise ConversionError(
            f"model_type {kind!r} is not supported. Fix: convert GPT-NeoX (Pythia) or Llama "
            "checkpoints"
        )
    missing = [
        k
        for k in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        )
        if k not in hf
    ]
    if missing:
        raise ConversionError(
            f"config.json lacks {', '.join(missing)}. Fix: use the config.json saved with the model"
        )
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    common = {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "num_heads": hf["num_attention_heads"],
        "ffn_hidden_size": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "rotary_base": float(theta),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    if kind == "gpt_neox":
        if not hf.get("use_parallel_residual", True) or hf.get("hidden_act", "gelu") != "gelu":
            raise ConversionError(
                "only GPT-NeoX models with parallel residual and exact GeLU (the Pythia shape) "
                "convert. Fix: use a Pythia-style checkpoint"
            )
        pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))  # transformers' default
        model = {
            **common,
            "family": "neox",
            "rotary_pct": float(pct),
            "norm_eps": hf.get("layer_norm_eps", 1e-5),
        }
    else:
        if (
            hf.get("attention_bias")
            or hf.get("mlp_bias")
            or rope.get("rope_type", "default") != "default"
        ):
            raise ConversionError(
                "only Llama models without biases and with default RoPE convert. Fix: use a "
                "plain Llama-architecture checkpoint"
            )
        model = {
            **common,
            "family": "llama",
            "num_kv_heads": hf.get("num_key_value_heads"),
            "norm_eps": hf.get("rms_norm_eps", 1e-6),
        }
    seq = min(2048, model["max_position_embeddings"])
    raw = {"model": model, "data": {"seq_len": seq}}
    if "sepllm" in hf:  # the attention pattern an export of ours carried
        s = hf["sepllm"]
        windows = [w if w is not None else model["max_position_embeddings"] for w in s["windows"]]
        raw["attention"] = {
            "kind": s["kind"],
            "init_tokens": s["init_tokens"],
            "window": windows,
            "fixed_interval": s["fixed_interval"],
        }
        if s["kind"] == "sepllm":
            raw["attention"]["separators"] = s["separator_ids"]
    return config_from_dict(raw, overrides)


def _index_files(index: Path) -> list[str]:
    from ..checkpoint.files import is_plain_name

    """The shard names of a safetensors index: plain file names beside it, never a path out of the folder."""
    try:
        files = set(json.loads(index.read_bytes().decode("utf-8"))["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(
            f"{index} is not a safetensors index ({type(e).__name__}: {e}). Fix: save the "
            "model again with save_pretrained, or copy the file again"
        ) from None
    for f in sorted(files, key=str):
        if not is_plain_name(f):
            raise ConversionError(
                f"{index} names the shard {f!r}, which is not a file name beside it (a path "
                f"is never followed out of {index.parent}). Fix: use a model folder from a "
                "source you trust, with plain shard names"
            )
    return sorted(files)


def read_hf_weights(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = _index_files(index)
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConversionError(
            f"{hf_dir} holds no model.safetensors (or index). Fix: save the model with "
            "safe_serialization (the default) or point --hf at the right directory"
        )
    out = {}
    for f in files:
        if not (hf_dir / f).is_file():
            raise ConversionError(
                f"shard {f} listed in {index.name} is missing from {hf_dir}. Fix: download "
                "or copy every shard"
            )
        out.update(load_file(str(hf_dir / f)))
    return out


def _save(tensors: dict, path: Path) -> None:
    """safetensors writes 0600; give the weights the mode every other exported file gets (the umask's)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_hf_weights(
    state: dict, out: Path, dtype: torch.dtype, max_shard_bytes: int = 5 * 2**30
) -> None:
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in state.items()}
    shards, current, size = [], {}, 0
    for k, v in tensors.items():
        if current and size + v.numel() * v.element_size() > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += v.numel() * v.element_size()
    shards.append(current)
    if len(shards) == 1:
        _save(shards[0], out / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, out / name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
