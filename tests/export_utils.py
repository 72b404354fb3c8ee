"""A random tiny project model, saved as a checkpoint and exported to a transformers directory."""

import torch

from megatron_sep.config import config_from_dict, dump_config
from megatron_sep.convert import export_hf
from megatron_sep.data.separators import resolve_separator_ids
from megatron_sep.data.tokenizer import load_tokenizer
from megatron_sep.model import build_model
from megatron_sep.checkpoint import WeightsOnly, save_checkpoint


def export_tiny(
    tmp_path,
    tokenizer,
    model: dict,
    attention: dict | None = None,
    *,
    num_layers=2,
    hidden_size=64,
    out_name="hf",
):
    """-> (our model in eval mode, export directory, tokenizer). Separators are the tokenizer's defaults."""
    tok = load_tokenizer(tokenizer)
    raw = {
        "model": {
            "num_layers": num_layers,
            "hidden_size": hidden_size,
            "num_heads": 4,
            "vocab_size": tok.vocab_size,
            "max_position_embeddings": 128,
            **model,
        },
        "data": {"tokenizer": str(tokenizer), "seq_len": 64},
    }
    if attention:
        raw["attention"] = {"separators": resolve_separator_ids(tok)[0], **attention}
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    save_checkpoint(
        tmp_path / "run" / "checkpoints",
        1,
        WeightsOnly(ours, cfg),
        {"consumed_samples": 0},
        dump_config(cfg),
        keep_last=1,
    )
    return ours, export_hf(tmp_path / "run", tmp_path / out_name), tok
