"""GPT-NeoX / DeepSpeed pipeline checkpoints (any tensor-parallel degree) -> tensors under transformers'
GPT-NeoX names, for `import-neox` (neox.py).

The layout: `global_stepN/layer_LL-model_TT-model_states.pt`, layer 0 the embedding, 2 .. L+1 the transformer
layers, then the final norm and the output layer; TT is the tensor-parallel rank. Shards are merged
(column-parallel weights on dim 0, row-parallel on dim 1, the rest replicated). The fused qkv is per head
[q, k, v] in both, so it needs no reordering.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..data.tokenizer import first_line
from .hf import ConversionError

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
