"""Atomic checkpoints under `run_dir/checkpoints/`.

Layout: `step_00000100/` holds the tensors (model and Adam state keyed by
parameter name, written by all ranks with torch.distributed.checkpoint in a
layout-independent form, see parallel/state.py), `meta.pt` (step, consumed
samples, the layout it was saved under), `rng_<rank>.pt` and `config.yaml`;
`latest` names the newest complete one. A save writes into a hidden temporary directory, fsyncs it,
renames it into place and only then moves `latest`, so a kill at any moment
leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..parallel.state import load_model_state, load_optim_state, model_state, optim_state

LATEST = "latest"
# Test-only fault point: exit hard inside the save of this step (after the tensors, before the rename).
CRASH_ENV = "MEGATRON_SEP_CRASH_IN_SAVE"


class CheckpointError(RuntimeError):
    pass


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _barrier(ctx) -> None:
    if ctx.world > 1:
        dist.barrier()


def save_checkpoint(root: Path, step: int, plan, meta: dict, config_text: str, keep_last: int) -> Path:
    """Collective: every rank writes its shards; rank 0 publishes the directory and `latest`."""
    ctx = plan.ctx
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(ctx)
    state = {"model": model_state(plan.model, ctx), "optim": optim_state(plan)}
    with warnings.catch_warnings():  # single-process saves are intended; DCP warns about them
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_{ctx.rank}.pt")
    _barrier(ctx)
    if ctx.rank == 0:
        torch.save({**meta, "step": step, "layout": {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp}}, tmp / "meta.pt")
        (tmp / "config.yaml").write_text(config_text)
        if os.environ.get(CRASH_ENV) == str(step):
            os._exit(86)
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resuming): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        pointer = root / f".{LATEST}.tmp"
        with open(pointer, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        _prune(root, keep_last, keep=name)
    _barrier(ctx)
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in done[:-keep_last]:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step_*"):  # leftovers of crashed saves
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` points to, or None when the directory has none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "meta.pt").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete. Fix: point "
                              f"{pointer} at a complete step_* directory, or remove it to start over")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run dir, a checkpoints dir (with `latest`) or a step_* dir."""
    p = Path(path)
    for cand in (p / "checkpoints", p):
        if (cand / LATEST).is_file():
            return latest_checkpoint(cand)
    if (p / "meta.pt").is_file():
        return p
    raise CheckpointError(f"{path} holds no checkpoint (no `latest` file and no meta.pt). Fix: pass a run "
                          "directory, its checkpoints/ folder, or a step_* folder")


def load_checkpoint(path: Path, plan, with_optimizer: bool = True) -> dict:
    """Collective. Loads tensors in place under the current layout (DCP reshards); returns meta.
    Restores this rank's RNG state when the checkpoint has one for it."""
    ctx = plan.ctx
    state = {"model": model_state(plan.model, ctx)}
    if with_optimizer:
        state["optim"] = optim_state(plan)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # DCP's own type is a BaseException, with tracebacks inside
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {path}: {reason} Fix: the checkpoint must come from a model with the "
                              "same architecture (compare its config.yaml with yours)") from None
    load_model_state(plan.model, state["model"])
    if with_optimizer:
        load_optim_state(plan, state["optim"])
        rng = path / f"rng_{ctx.rank}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
    return torch.load(path / "meta.pt", weights_only=False)
