"""Atomic checkpoints under `run_dir/checkpoints/`.

Layout: `step_00000100/` holds the tensors (model and Adam state keyed by
parameter name, written by all ranks with torch.distributed.checkpoint in a
layout-independent form, see state.py), `meta.json` (step, consumed
samples, the layout it was saved under), `rng_<rank>.safetensors` and `config.yaml`;
`latest` names the newest complete one. A save writes into a hidden temporary directory, fsyncs it,
renames it into place and only then moves `latest`, so a kill at any moment
leaves the previous checkpoint loadable. An async save (checkpoint.async_save) copies the state to
host memory, writes it in a background thread, and publishes it the same way once the write is done.
Nothing here unpickles: see files.py.

The object saved or loaded is any holder of training state (an engine, or `WeightsOnly` for one
process) with `ctx`, `cfg`, `state_dict()` and `load_state_dict(read, with_optimizer)`.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..model import build_model
from .files import (
    META,
    STEP_NAME,
    CheckpointError,
    SafeReader,
    LATEST,
    is_complete,
    list_checkpoints,
    point_latest,
    load_rng,
    read_meta,
    rng_file,
    save_rng,
    write_meta,
)


# Test-only fault point: exit hard inside the save of step N: "N" or "N:tensors" after the tensors are
# written (before any rename), "N:swap" in a re-save between moving the old folder aside and renaming,
# "N:async" right after an async save has handed its write to the background thread.
CRASH_ENV = "MEGATRON_SEP_CRASH_IN_SAVE"


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


def _barrier(ctx) -> None:
    if ctx.world > 1:
        dist.barrier()


def save_checkpoint(
    root: Path,
    step: int,
    holder,
    meta: dict,
    config_text: str,
    keep_last: int,
    verified_step: int | None = None,
    async_save: bool = False,
    retain=(),
):
    """Collective: every rank writes its shards; rank 0 publishes the directory and `latest`.
    Returns the published path, or with async_save a PendingSave whose write runs in the background.
    A failed write (disk full, ...) raises CheckpointError and leaves every earlier checkpoint as it was.
    `retain`: steps never rotated out (checkpoint.extra_save_steps)."""
    ctx = holder.ctx
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        # leftovers of crashed saves (no save is in flight now)
        for old in root.glob(".tmp-step_*"):
            shutil.rmtree(old, ignore_errors=True)
    _barrier(ctx)
    state = holder.state_dict()  # {"model": ..., "optim": ...} keyed by parameter name, any engine
    layout = {"tp": ctx.tp, "pp": ctx.pp, "cp": ctx.cp, "dp": ctx.dp}
    pending = PendingSave(
        ctx,
        root,
        tmp,
        final,
        {**meta, "step": step, "layout": layout},
        config_text,
        keep_last,
        retain,
    )
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_rng(tmp / f"rng_{ctx.rank}.safetensors")
        with warnings.catch_warnings():  # single-process saves are intended; DCP warns about them
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            if async_save:
                pending.fut = dcp.async_save(
                    state,
                    storage_writer=dcp.FileSystemWriter(str(tmp)),
                    process_group=_cpu_group(ctx),
                    no_dist=not dist.is_initialized(),
                )
            else:
                dcp.save(state, checkpoint_id=str(tmp))
    except (
        Exception,
        CheckpointException,
    ) as e:  # DCP wraps OSError (ENOSPC, ...) in its own BaseException
        pending.fail(e)
    if async_save:
        _crash_point(step, "async")
        return pending
    pending.complete(verified_step)
    _barrier(ctx)
    return final


_CPU_GROUPS: dict = {}


def _cpu_group(ctx):
    """Async saves gather their write results from a background thread: over gloo, beside NCCL's traffic."""
    if ctx.world == 1:
        return None
    backend = str(dist.get_backend())
    if backend == "gloo" or "cpu:" in backend:
        return None
    if "group" not in _CPU_GROUPS:
        _CPU_GROUPS["group"] = dist.new_group(backend="gloo")
    return _CPU_GROUPS["group"]


class PendingSave:
    """A save whose tensors are (being) written. `complete` is per rank: it waits for this rank's write
    and, on rank 0, publishes the folder. Rank 0's write finishes only after every rank's data files and
    RNG states are written (DCP gathers their results to write its index), so rank 0 alone may publish."""

    def __init__(
        self,
        ctx,
        root: Path,
        tmp: Path,
        final: Path,
        meta: dict,
        config_text: str,
        keep_last: int,
        retain=(),
    ):
        self.ctx, self.root, self.tmp, self.final = ctx, root, tmp, final
        self.meta, self.config_text, self.keep_last = meta, config_text, keep_last
        self.fut, self.finished, self.retain = None, False, retain

    @property
    def step(self) -> int:
        return self.meta["step"]

    def done(self) -> bool:
        return self.finished or self.fut is None or self.fut.done()

    def complete(self, verified_step: int | None) -> Path:
        if self.finished:
            return self.final
        if self.fut is not None:
            try:
                self.fut.result()
            except (Exception, CheckpointException) as e:
                self.fail(e)
        try:
            if self.ctx.rank == 0:
                good = None if verified_step is None else min(verified_step, self.step)
                write_meta(self.tmp, {**self.meta, "verified_step": good})
                (self.tmp / "config.yaml").write_text(self.config_text)
                _crash_point(self.step, "tensors")
                _fsync_tree(self.tmp)
                _publish(self.root, self.tmp, self.final)
                prune(
                    self.root,
                    self.keep_last,
                    verified_step,
                    keep=self.final.name,
                    retain=self.retain,
                )
        except OSError as e:
            self.fail(e)
        self.finished = True
        return self.final

    def fail(self, e: BaseException):
        self.finished = True
        if self.ctx.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
        # Ctrl-C inside DCP's workers: an interrupt, not a write error
        if "KeyboardInterrupt" in str(e):
            raise KeyboardInterrupt from None
        raise CheckpointError(
            f"cannot write checkpoint {self.final}: {_reason(e)}. The earlier checkpoints are "
            "untouched. Fix: free disk space or check permissions, then run again to "
            "resume"
        ) from None


def _crash_point(step: int, phase: str) -> None:
    """Test-only: exit hard at `phase` of this step's save when CRASH_ENV says `step` or `step:phase`."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted is not None and wanted in (
        f"{step}:{phase}",
        str(step) if phase == "tensors" else "",
    ):
        os._exit(86)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`, then point `latest` at it. The new pointer is written (beside
    `latest`) before the rename, so a kill between the rename and the pointer's move in a first save is
    read back by `latest_checkpoint`. A re-save of an existing step moves the old folder aside first and
    deletes it only once the new one is in place; a kill between the two renames is repaired by
    `latest_checkpoint`, which reads the moved-aside folder."""
    pointer = root / f".{LATEST}.tmp"
    with open(pointer, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    old = root / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        _fsync_dir(root)
        _crash_point(int(final.name[len("step_") :]), "swap")
    os.rename(tmp, final)
    _fsync_dir(root)
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def _step_of(name: str) -> int:
    return int(name[len("step_") :])


def prune(
    root: Path,
    keep_last: int,
    verified_step: int | None = None,
    keep: str | None = None,
    retain=(),
) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, never `keep`, the steps in `retain`, nor
    the newest one whose weights are known to train on (step <= verified_step): a run whose weights blew up
    after it was saved must keep one checkpoint to go back to."""
    # a re-save killed mid-swap: its old folder is the step again
    for p in root.glob(".old-step_*"):
        target = root / p.name[len(".old-") :]
        if is_complete(target):
            shutil.rmtree(p, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.rename(p, target)
    protect = {keep, newest_verified(root, verified_step)}
    for name in list_checkpoints(root)[:-keep_last]:
        if name not in protect and _step_of(name) not in retain:
            shutil.rmtree(root / name, ignore_errors=True)


def newest_verified(root: Path, verified_step: int | None) -> str | None:
    good = [
        n
        for n in list_checkpoints(root)
        if verified_step is not None and _step_of(n) <= verified_step
    ]
    return good[-1] if good else None


def _pointer_fix(root: Path) -> str:
    """The fix for a `latest` that names no checkpoint: the newest complete one, or starting over."""
    newest, pointer = list_checkpoints(root), root / LATEST
    if newest:
        return (
            f"Fix: {point_latest(root, newest[-1])} to use the newest complete checkpoint (training resumes "
            "from it; to train from scratch instead, use a new train.run_dir, which leaves these as they are)"
        )
    return f"Fix: remove {pointer} to start over"


def _read_pointer(root: Path) -> str | None:
    """The step name in `latest`, None when there is no `latest`; anything else is one CheckpointError."""
    pointer = root / LATEST
    if pointer.is_dir():
        raise CheckpointError(
            f"{pointer} is a folder, not the file naming the newest checkpoint. "
            f"{_pointer_fix(root)}"
        )
    try:
        raw = pointer.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(
            f"{pointer} cannot be read ({e.strerror or e}). Fix: check its permissions"
        ) from None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not STEP_NAME.fullmatch(name):
        shown = repr(raw[:40]) if name is None else repr(name[:40])
        raise CheckpointError(
            f"{pointer} holds {shown}, not the name of a step_* folder beside it (a path is "
            f"never followed out of {root}). {_pointer_fix(root)}"
        )
    return name


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` points to, or None when the directory has none. Checkpoints without a
    readable `latest` are an error, never a fresh start that would rotate them out."""
    for _ in range(3):
        name = _read_pointer(root)
        if name is None:
            return _without_pointer(root)
        path = root / name
        if is_complete(path):
            return path
        if is_complete(root / f".old-{name}"):
            # a re-save of this step was killed between its two renames
            return root / f".old-{name}"
        if _read_pointer(root) == name:
            break  # else a live run moved `latest` on while this read it: read again
    raise CheckpointError(
        f"{root / LATEST} names {name}, which is missing or incomplete. {_pointer_fix(root)}"
    )


def _without_pointer(root: Path) -> Path | None:
    pending = root / f".{LATEST}.tmp"
    try:
        name = pending.read_text().strip() if pending.is_file() else ""
    except (OSError, UnicodeDecodeError):
        name = ""
    if STEP_NAME.fullmatch(name) and is_complete(root / name):
        return root / name  # a first save killed between its rename and moving `latest` in
    newest = list_checkpoints(root)
    if newest:
        raise CheckpointError(
            f"{root} holds checkpoints (the newest complete one is {newest[-1]}) but no "
            f"`latest` file names one. {_pointer_fix(root)}"
        )
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run dir, a checkpoints dir (with `latest`) or a step_* dir."""
    p = Path(path)
    for cand in (p / "checkpoints", p):
        if (cand / LATEST).exists() or list_checkpoints(cand):
            return latest_checkpoint(cand)
    if is_complete(p):
        return p
    raise CheckpointError(
        f"{path} holds no checkpoint (no `latest` file and no {META}). Fix: pass a run "
        "directory, its checkpoints/ folder, or a step_* folder"
    )


def check_matches(path: Path, cfg, with_optimizer: bool) -> None:
    """Every tensor of the plain model (and its Adam state) is in the checkpoint with the same global shape,
    and the checkpoint holds no model tensor the model lacks. DCP alone loads a subset silently."""
    with torch.device("meta"):  # the whole plain model: a pipeline stage holds only its layers
        model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    want = {f"model.{k}": s for k, s in shapes.items()}
    if with_optimizer:
        for n in names:
            want.update(
                {
                    f"optim.{n}.exp_avg": shapes[n],
                    f"optim.{n}.exp_avg_sq": shapes[n],
                    f"optim.{n}.step": (),
                }
            )
    stored = SafeReader(str(path)).read_metadata().state_dict_metadata
    have = {k: tuple(m.size) for k, m in stored.items() if hasattr(m, "size")}
    problems = [f"{k} is missing from the checkpoint" for k in want if k not in have]
    problems += [
        f"{k} has shape {list(have[k])} in the checkpoint but {list(s)} in the model"
        for k, s in want.items()
        if k in have and have[k] != s
    ]
    problems += [
        f"{k} is in the checkpoint but not in the model"
        for k in have
        if k.startswith("model.") and k not in want
    ]
    if problems:
        raise CheckpointError(
            f"{path} does not match this model: {problems[0]} ({len(problems)} differences). "
            "Fix: use the architecture it was saved with (compare its config.yaml with yours), "
            "or a new train.run_dir"
        )


def _gone(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} was deleted while it was read: a run still writing to this folder rotated it "
        "out (checkpoint.keep_last). Fix: run the command again (it reads the newest one), or "
        "copy a step_* folder elsewhere first"
    )


def load_checkpoint(path: Path, holder, with_optimizer: bool = True) -> dict:
    """Collective. Loads tensors in place under the current layout (DCP reshards); returns meta.
    Restores this rank's RNG state when the checkpoint has one for it."""
    ctx = holder.ctx
    try:
        meta = read_meta(path)
        check_matches(path, holder.cfg, with_optimizer)
    except CheckpointError:
        if not path.exists():
            raise _gone(path) from None
        raise

    def read(state: dict) -> None:  # the holder asks for what it holds, in one or several parts
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=SafeReader(str(path)))
        except CheckpointError:
            raise
        except (
            Exception,
            CheckpointException,
        ) as e:  # DCP's own type is a BaseException, with tracebacks inside
            if not path.exists():
                raise _gone(path) from None
            if "CheckpointError" in str(e):  # SafeReader's refusal, wrapped by DCP's collective
                raise CheckpointError(_reason(e).split("CheckpointError: ")[-1]) from None
            raise CheckpointError(
                f"cannot load {path}: {_reason(e)} Fix: the checkpoint must come from a model "
                "with the same architecture (compare its config.yaml with yours)"
            ) from None

    holder.load_state_dict(read, with_optimizer)
    if with_optimizer:
        rng = rng_file(path, ctx.rank)
        if rng is not None:
            load_rng(rng)
    return meta
