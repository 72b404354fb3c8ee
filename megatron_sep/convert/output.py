"""Where an import writes: a step-0 project checkpoint in a new folder, never beside or inside another
run's checkpoints."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import WeightsOnly, list_checkpoints, save_checkpoint
from ..config import dump_config
from ..data.tokenizer import first_line
from ..model import build_model
from ..outdir import prepare_out
from .hf import ConversionError


def _holds_checkpoint(p: Path, folders: bool) -> bool:
    """Ours (latest, meta.json or meta.pt), GPT-NeoX / DeepSpeed (latest, global_step*, layer files) or Megatron's
    (its tracker file, iter_* / mp_rank_* folders, torch_dist .metadata). Folder names count for `out`
    itself only: a parent may well hold an unrelated iter_* folder."""
    marks = (
        "latest",
        "meta.json",
        "meta.pt",
        "latest_checkpointed_iteration.txt",
        ".metadata",
        "model_optim_rng.pt",
    )
    if any((p / m).is_file() for m in marks):
        return True
    globs = ("global_step*", "iter_*", "mp_rank_*", "layer_*-model_*") if folders else ()
    return p.is_dir() and any(next(p.glob(g), None) is not None for g in globs)


def refuse_checkpoint_dir(out: Path) -> None:
    inside = [p for p in (out, *out.parents) if _holds_checkpoint(p, p == out)]
    if list_checkpoints(out / "checkpoints") or (out / "checkpoints" / "latest").exists() or inside:
        raise ConversionError(
            f"{out} already holds checkpoints, or lies inside a checkpoint folder, which an "
            "import would mix with. Fix: choose a new --out (this is never done, even with "
            "--force)"
        )


def save_imported(
    cfg, state: dict, out: Path, force: bool, source: str, config_name: str, owned=()
) -> None:
    """A step-0 project checkpoint of `state` (our plain-model names) under out/checkpoints."""
    model = build_model(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConversionError(
            f"the weights in {source} do not match {config_name} ({first_line(e)} "
            f"...). Fix: use the {config_name.removeprefix('its ').removeprefix('the ')} saved with "
            "these weights, and every file of the checkpoint"
        ) from None
    prepare_out(out, force, owned, "write its checkpoint beside the other files")
    save_checkpoint(
        out / "checkpoints",
        0,
        WeightsOnly(model, cfg),
        {"consumed_samples": 0},
        dump_config(cfg),
        keep_last=1,
    )
