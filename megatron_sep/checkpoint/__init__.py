"""Checkpoints: the atomic store (save, latest, resolve, check, rotate), layout-independent state, and
loading weights without an optimizer (load_model)."""

from .files import CheckpointError, read_meta
from .load import load_model, load_weights
from .state import WeightsOnly
from .store import (
    CRASH_ENV,
    PendingSave,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_verified,
    prune,
    resolve_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CRASH_ENV",
    "CheckpointError",
    "PendingSave",
    "WeightsOnly",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "newest_verified",
    "prune",
    "read_meta",
    "resolve_checkpoint",
    "save_checkpoint",
]
