"""`export-hf` and `import-hf`: whole-directory conversions around the tensor maps in hf.py; and the
`megatron-sep` commands of this package (`cmd_*`: export-hf, import-hf, import-neox, import-megatron)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..data.separators import resolve_separator_ids
from ..data.tokenizer import TokenizerError, load_tokenizer, same_vocabulary
from ..checkpoint import load_model
from ..model.gpt import padded_vocab
from .hf import (
    ConversionError,
    config_from_hf,
    from_hf_state,
    hf_config,
    read_hf_weights,
    to_hf_state,
    write_hf_weights,
)
from .hf_tokenizer import write_hf_tokenizer
from .output import refuse_checkpoint_dir, save_imported
from ..outdir import prepare_out
from .megatron import import_megatron
from .neox import import_neox

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Every file an export may write; --force replaces these and leaves anything else in the directory alone.
EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "modeling_sepllm.py",
    "modeling_subllm.py",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def export_hf(
    load: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    tokenizer: str | None = None,
    force: bool = False,
) -> Path:
    model, cfg = load_model(load)
    if cfg.model.arch == "dlcm":
        raise ConversionError(
            "model.arch=dlcm has no Hugging Face model yet (no remote code for its concept stacks). "
            "Fix: generate and evaluate it with `megatron-sep generate` / `megatron-sep eval`, which run "
            "the project model"
        )
    if cfg.model.subsampled and (cfg.model.family != "llama" or cfg.attention.kind != "dense"):
        raise ConversionError(
            f"model.structure={cfg.model.structure!r} (SUBLLM) exports for the llama family with "
            "dense attention only (modeling_subllm.py). Fix: evaluate it with `megatron-sep eval`, "
            "which runs the project model"
        )
    if cfg.attention.reset_per_document:
        raise ConversionError(
            "attention.reset_per_document has no transformers equivalent (inference sees one "
            "document). Fix: export with reset_per_document off (weights are unaffected)"
        )
    tok = _export_tokenizer(tokenizer or cfg.data.tokenizer, cfg)
    if tok is not None:
        _check_vocabulary(tok, cfg, given=tokenizer is not None)
    final = prepare_out(Path(out), force, (), "replace only the files an export writes")
    # everything is written beside the old files first, then moved in: a failed export deletes nothing,
    # and a tokenizer (or anything else the export reads) inside --out is read before it is replaced
    out = Path(tempfile.mkdtemp(prefix=".export-", dir=final))
    try:
        _write_export(model, cfg, tok, out, dtype)
        _move_in(out, final, EXPORT_FILES)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return final


def _write_export(model, cfg, tok, out: Path, dtype: str) -> None:
    eod, pad = (tok.eod_id, tok.pad_id) if tok else (None, None)
    conf = hf_config(cfg, eod, pad)
    conf["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    # stock classes plus a small subclass that swaps the attention mask
    if cfg.attention.kind != "dense":
        conf.update(sepllm_remote_code(cfg, conf["model_type"]))
        shutil.copy(Path(__file__).with_name("modeling_sepllm.py"), out / "modeling_sepllm.py")
    if cfg.model.subsampled:  # the stock Llama layers, run in the structure's order
        conf.update(
            {
                "model_type": "subllm_llama",
                "architectures": ["SubLLMLlamaForCausalLM"],
                "use_cache": False,
                "auto_map": {
                    "AutoConfig": "modeling_subllm.SubLLMLlamaConfig",
                    "AutoModelForCausalLM": "modeling_subllm.SubLLMLlamaForCausalLM",
                },
                "subllm": {"structure": "".join(model.structure)},
            }
        )
        shutil.copy(Path(__file__).with_name("modeling_subllm.py"), out / "modeling_subllm.py")
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    gen = {"eos_token_id": eod, "pad_token_id": pad, "bos_token_id": eod}
    (out / "generation_config.json").write_text(
        json.dumps({**gen, "use_cache": False} if cfg.model.subsampled else gen, indent=1)
    )
    state = to_hf_state(model.state_dict(), cfg)
    for i in range(len(getattr(model, "down", ()))):  # SUBLLM's scorers and bypass scales
        state[f"model.down.{i}.weight"] = model.down[i].score.weight
        state[f"model.bypass.{i}"] = model.bypass[i].scale
    if cfg.attention.kind != "dense" and "embed_out.weight" in state:
        # transformers maps Pythia's embed_out only for model_type gpt_neox; the remote code says lm_head
        state["lm_head.weight"] = state.pop("embed_out.weight")
    write_hf_weights(state, out, DTYPES[dtype])
    if tok:
        write_hf_tokenizer(tok, out, cfg.model.max_position_embeddings)


def _move_in(stage: Path, out: Path, owned: tuple[str, ...]) -> None:
    """Move the staged files over their old versions, then drop the export files the new export did not
    write (the shards of an earlier, differently sharded export)."""
    new = sorted(p.name for p in stage.iterdir())
    for name in new:
        os.replace(stage / name, out / name)
    for pattern in owned:
        for p in out.glob(pattern):
            if p.is_file() and p.name not in new:
                p.unlink()


def _check_vocabulary(tok, cfg, given: bool) -> None:
    """The exported tokenizer must be the model's: ids it lacks would decode as nothing, ids past the model's
    vocabulary have no embedding. With --tokenizer, it is compared with the run's own when that loads."""
    V = cfg.model.vocab_size
    if tok.vocab_size > V:
        raise ConversionError(
            f"the tokenizer {tok.path} has {tok.vocab_size} tokens, more than the model's {V} "
            f"(model.vocab_size): ids >= {V} have no embedding. Fix: pass the tokenizer the run "
            "trained with"
        )
    if not given:
        return
    try:
        own = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    except TokenizerError:
        own = None
    if own is not None and not same_vocabulary(tok, own):
        raise ConversionError(
            f"the tokenizer {tok.path} ({tok.vocab_size} tokens) is not the one the run trained "
            f"with ({own.path}, {own.vocab_size} tokens): text would map to other ids. Fix: "
            "pass that tokenizer, or leave --tokenizer out"
        )
    if own is None and tok.vocab_size < V:
        raise ConversionError(
            f"the tokenizer {tok.path} has {tok.vocab_size} tokens, fewer than the model's {V} "
            f"(model.vocab_size): ids {tok.vocab_size}..{V - 1} would decode as nothing. Fix: "
            "pass the tokenizer the run trained with"
        )


def _export_tokenizer(path: str | None, cfg):
    """The run's tokenizer; a run without one (data.mock) exports weights only."""
    if not path:
        return None
    try:
        return load_tokenizer(path)
    except TokenizerError as e:
        raise ConversionError(
            f"the tokenizer {path} cannot be loaded ({str(e).split('. Fix:')[0]}). Fix: pass "
            "--tokenizer PATH"
        ) from None


def sepllm_remote_code(cfg, model_type: str) -> dict:
    a, m = cfg.attention, cfg.model
    name = {"llama": "SepLLMLlama", "gpt_neox": "SepLLMGPTNeoX"}[model_type]
    return {
        "model_type": f"sepllm_{model_type}",
        "architectures": [f"{name}ForCausalLM"],
        "auto_map": {
            "AutoConfig": f"modeling_sepllm.{name}Config",
            "AutoModelForCausalLM": f"modeling_sepllm.{name}ForCausalLM",
        },
        "sepllm": {
            "kind": a.kind,
            "separator_ids": [int(x) for x in a.separators] if a.kind == "sepllm" else [],
            "init_tokens": a.init_tokens,
            "fixed_interval": a.fixed_interval,
            "windows": a.layer_windows(m.num_layers, m.max_position_embeddings),
        },
    }


def import_hf(hf_dir: str | Path, out: str | Path, overrides=(), force: bool = False) -> Path:
    hf_dir, out = Path(hf_dir), Path(out)
    refuse_checkpoint_dir(out)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(
            f"{hf_dir} has no config.json. Fix: point --hf at a transformers model directory"
        )
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except ValueError as e:
        raise ConversionError(
            f"{hf_dir / 'config.json'} is not valid JSON ({e}). Fix: use the config.json "
            "saved with the model"
        ) from None
    tokenizer = next(
        (
            str((hf_dir / n).absolute())
            for n in ("tokenizer.json", "tokenizer.model")
            if (hf_dir / n).is_file()
        ),
        None,
    )
    extra = [f"data.tokenizer={tokenizer}"] if tokenizer else []
    cfg = config_from_hf(hf, extra + list(overrides))
    a = cfg.attention
    if a.kind == "sepllm" and any(isinstance(x, str) for x in a.separators):
        if not tokenizer:
            raise ConversionError(
                "attention.kind=sepllm with separator strings needs a tokenizer in the HF "
                "directory. Fix: add it, or pass ids: --set 'attention.separators=[15, 13]'"
            )
        ids, _ = resolve_separator_ids(
            load_tokenizer(tokenizer), [x for x in a.separators if isinstance(x, str)]
        )
        a.separators = sorted(set(ids + [x for x in a.separators if isinstance(x, int)]))
    state = from_hf_state(read_hf_weights(hf_dir), cfg, padded_vocab(cfg.model.vocab_size))
    save_imported(cfg, state, out, force, str(hf_dir), "its config.json")
    return out


def cmd_export_hf(args) -> int:
    out = export_hf(args.load, args.out, args.dtype, tokenizer=args.tokenizer, force=args.force)
    print(f"wrote {out} ({load_hint(out)})")
    return 0


def load_hint(out: Path) -> str:
    """How to load an export. transformers 5 reads config.json before tokenizer_config.json, so
    without trust_remote_code=False it asks about the model's remote code for the tokenizer too."""
    if "auto_map" not in json.loads((out / "config.json").read_text()):
        return "load with transformers.AutoModelForCausalLM.from_pretrained"
    return (
        "load with transformers.AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) "
        "and the tokenizer, which runs no code, with AutoTokenizer.from_pretrained(dir, "
        "trust_remote_code=False)"
    )


def cmd_import_hf(args) -> int:
    overrides = list(args.overrides) + (
        [f"attention.kind={args.attention}"] if args.attention else []
    )
    out = import_hf(args.hf, args.out, overrides, force=args.force)
    print(f"wrote {out}/checkpoints; continue training with --set checkpoint.load={out}")
    return 0


def cmd_import_neox(args) -> int:
    out, notes = import_neox(
        args.config, args.out, args.checkpoint, args.gpus, args.overrides, force=args.force
    )
    for note in notes:
        print(f"note: {note}")
    what = f"{out}/config.yaml" + (f" and {out}/checkpoints" if args.checkpoint else "")
    print(f"wrote {what}; train with: megatron-sep train -c {out}/config.yaml")
    return 0


def cmd_import_megatron(args) -> int:
    out, notes = import_megatron(
        args.checkpoint, args.out, args.overrides, args.force, args.config, args.num_heads
    )
    for note in notes:
        print(f"note: {note}")
    print(
        f"wrote {out}/config.yaml and {out}/checkpoints; train with: megatron-sep train -c {out}/config.yaml"
    )
    return 0
