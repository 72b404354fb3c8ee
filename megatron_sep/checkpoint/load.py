"""Weights out of a checkpoint for export, evaluation, generation and distillation: no optimizer, no
process group, nothing from training or the engines."""

from __future__ import annotations

from pathlib import Path

from ..config import load_config
from ..model import build_model
from .state import WeightsOnly
from .store import load_checkpoint, resolve_checkpoint


def load_weights(path: Path, cfg):
    """A single-process model of `cfg` with the weights of the checkpoint at `path`, saved under any layout."""
    model = build_model(cfg)
    load_checkpoint(path, WeightsOnly(model, cfg), with_optimizer=False)
    return model.eval()


def load_model(load: str | Path):
    """(model, config) of a run directory, its checkpoints/ folder or a step_* folder; the config is the one
    saved with the weights."""
    path = resolve_checkpoint(load)
    cfg = load_config(path / "config.yaml")
    return load_weights(path, cfg), cfg
