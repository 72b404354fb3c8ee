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

from ..model import GPT
from ..parallel.apply import ParallelPlan
from ..parallel.context import ParallelContext


LATEST = "latest"
# Test-only fault point: exit hard inside the save of step N: "N" or "N:tensors" after the tensors are
# written (before any rename), "N:swap" in a re-save between moving the old folder aside and renaming.
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
    """Collective: every rank writes its shards; rank 0 publishes the directory and `latest`.
    A failed write (disk full, ...) raises CheckpointError and leaves every earlier checkpoint as it was."""
    ctx = plan.ctx
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(ctx)
    state = plan.checkpoint_state()  # {"model": ..., "optim": ...} keyed by parameter name, any engine
    try:
        with warnings.catch_warnings():  # single-process saves are intended; DCP warns about them
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_{ctx.rank}.pt")
        _barrier(ctx)
        if ctx.rank == 0:
            layout = {"tp": ctx.tp, "pp": ctx.pp, "cp": ctx.cp, "dp": ctx.dp}
            torch.save({**meta, "step": step, "layout": layout}, tmp / "meta.pt")
            (tmp / "config.yaml").write_text(config_text)
            _crash_point(step, "tensors")
            _fsync_tree(tmp)
            _publish(root, tmp, final)
            _prune(root, keep_last, keep=name)
    except (Exception, CheckpointException) as e:  # DCP wraps OSError (ENOSPC, ...) in its own BaseException
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if "KeyboardInterrupt" in str(e):  # Ctrl-C inside DCP's workers: an interrupt, not a write error
            raise KeyboardInterrupt from None
        raise CheckpointError(f"cannot write checkpoint {final}: {_reason(e)}. The earlier checkpoints are "
                              "untouched. Fix: free disk space or check permissions, then run again to "
                              "resume") from None
    _barrier(ctx)
    return final


def _crash_point(step: int, phase: str) -> None:
    """Test-only: exit hard at `phase` of this step's save when CRASH_ENV says `step` or `step:phase`."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted is not None and wanted in (f"{step}:{phase}", str(step) if phase == "tensors" else ""):
        os._exit(86)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`, then point `latest` at it. A re-save of an existing step
    moves the old folder aside first and deletes it only once the new one is in place; a kill between
    the two renames is repaired by `latest_checkpoint`, which reads the moved-aside folder."""
    old = root / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        _fsync_dir(root)
        _crash_point(int(final.name[len("step_"):]), "swap")
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / f".{LATEST}.tmp"
    with open(pointer, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def _prune(root: Path, keep_last: int, keep: str) -> None:
    for p in root.glob(".old-step_*"):  # a re-save killed mid-swap: its old folder is the step again
        target = root / p.name[len(".old-"):]
        if (target / "meta.pt").is_file():
            shutil.rmtree(p, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.rename(p, target)
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
    if not (path / "meta.pt").is_file() and (root / f".old-{path.name}" / "meta.pt").is_file():
        return root / f".old-{path.name}"  # a re-save of this step was killed between its two renames
    if not (path / "meta.pt").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete. Fix: point "
                              f"{pointer} at a complete step_* directory, or remove it to start over")
    return path


def list_checkpoints(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*") if (p / "meta.pt").is_file()) if root.is_dir() else []


def load_whole_model(path: Path, cfg):
    """A single-process model of `cfg` with the weights of the checkpoint at `path`, saved under any layout."""
    model = GPT(cfg)
    load_checkpoint(path, ParallelPlan(model, cfg, ParallelContext()), with_optimizer=False)
    return model.eval()


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


def read_meta(path: Path) -> dict:
    try:
        meta = torch.load(path / "meta.pt", weights_only=False)
    except Exception as e:  # empty or truncated file: EOFError, RuntimeError, UnpicklingError
        raise CheckpointError(f"{path / 'meta.pt'} is empty or corrupt ({type(e).__name__}). Fix: resume from "
                              "an earlier step_* folder (point `latest` at it)") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{path / 'meta.pt'} holds no step. Fix: resume from an earlier step_* folder")
    return meta


def check_matches(path: Path, cfg, with_optimizer: bool) -> None:
    """Every tensor of the plain model (and its Adam state) is in the checkpoint with the same global shape,
    and the checkpoint holds no model tensor the model lacks. DCP alone loads a subset silently."""
    from ..model import GPT

    with torch.device("meta"):  # the whole plain model: a pipeline stage holds only its layers
        model = GPT(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    want = {f"model.{k}": s for k, s in shapes.items()}
    if with_optimizer:
        for n in names:
            want.update({f"optim.{n}.exp_avg": shapes[n], f"optim.{n}.exp_avg_sq": shapes[n], f"optim.{n}.step": ()})
    try:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(f"cannot read the tensor index of {path}: {_reason(e)}. Fix: resume from an "
                              "earlier step_* folder") from None
    have = {k: tuple(m.size) for k, m in stored.items() if hasattr(m, "size")}
    problems = [f"{k} is missing from the checkpoint" for k in want if k not in have]
    problems += [f"{k} has shape {list(have[k])} in the checkpoint but {list(s)} in the model"
                 for k, s in want.items() if k in have and have[k] != s]
    problems += [f"{k} is in the checkpoint but not in the model" for k in have
                 if k.startswith("model.") and k not in want]
    if problems:
        raise CheckpointError(f"{path} does not match this model: {problems[0]} ({len(problems)} differences). "
                              "Fix: use the architecture it was saved with (compare its config.yaml with yours), "
                              "or a new train.run_dir")


def load_checkpoint(path: Path, plan, with_optimizer: bool = True) -> dict:
    """Collective. Loads tensors in place under the current layout (DCP reshards); returns meta.
    Restores this rank's RNG state when the checkpoint has one for it."""
    ctx = plan.ctx
    meta = read_meta(path)
    check_matches(path, plan.cfg, with_optimizer)

    def read(state: dict) -> None:  # the plan asks for what it holds, in one or several parts
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # DCP's own type is a BaseException, with tracebacks inside
            raise CheckpointError(f"cannot load {path}: {_reason(e)} Fix: the checkpoint must come from a model "
                                  "with the same architecture (compare its config.yaml with yours)") from None

    plan.load_checkpoint_state(read, with_optimizer)
    if with_optimizer:
        rng = path / f"rng_{ctx.rank}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
    return meta
