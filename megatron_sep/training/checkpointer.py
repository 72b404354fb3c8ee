"""When and what the training loop saves: the checkpoint store's policy for one run (checkpoint/ holds the
store itself). It knows which steps updated (a step whose update was skipped is never saved), the newest
step known to train (`verified`: never rotated out), and an async save in flight."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_verified,
    prune,
    resolve_checkpoint,
    save_checkpoint,
)
from ..checkpoint.files import LATEST, point_latest
from ..config import Config, ConfigError


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, ...); the message names the last good checkpoint."""


class Checkpointer:
    def __init__(self, cfg: Config, run_dir: Path, engine, config_text: str, log):
        self.cfg, self.engine, self.config_text, self.log = cfg, engine, config_text, log
        self.ctx = engine.ctx
        self.root = run_dir / "checkpoints"
        # saved: the step on disk (or being written); verified: the newest step whose weights gave a finite
        # loss (the next step updated, or its evaluation was finite); streak: steps skipped in a row;
        # pending: an async save being written; due: a save was put off to the next step that updates
        self.saved, self.verified, self.streak, self.pending, self.due_now = (
            None,
            None,
            0,
            None,
            False,
        )

    def resume(self) -> tuple[int, int]:
        """(step, consumed samples) to start from: the latest checkpoint of this run, or checkpoint.load's
        weights at step 0, or a fresh start."""
        c = self.cfg.checkpoint
        if not c.resume and list_checkpoints(self.root):
            raise ConfigError(
                "checkpoint.resume",
                False,
                f"{self.root} holds checkpoints of an earlier run, "
                "which this run would overwrite and rotate out",
                "use a new train.run_dir, or resume (checkpoint.resume=true)",
            )
        path = latest_checkpoint(self.root) if c.resume else None
        if path is not None:
            meta = load_checkpoint(path, self.engine)
            self.verified = meta.get("verified_step")
            self.saved = meta["step"]  # the state on disk: stopping before a new step saves nothing
            self.log(
                f"resumed from {path} at step {meta['step']} ({meta['consumed_samples']} samples consumed)"
            )
            return meta["step"], meta["consumed_samples"]
        if c.load:
            path = resolve_checkpoint(c.load)
            load_checkpoint(path, self.engine, with_optimizer=False)
            self.log(f"initialised weights from {path}")
        return 0, 0

    # ---- what the loop reports -------------------------------------------------------------------
    def updated(self, step: int) -> None:
        """The step that started from `step`'s weights updated: they train. The first update after a save
        confirms it, so older checkpoints beyond keep_last can go."""
        self.verified, self.streak = step, 0
        if self.ctx.rank == 0 and self.pending is None and self.saved == self.verified:
            c = self.cfg.checkpoint
            prune(self.root, c.keep_last, self.verified, retain=set(c.extra_save_steps))

    def skipped(self) -> None:
        self.streak += 1

    def evaluated(self, step: int, finite: bool) -> None:
        if finite:
            self.verified = step

    # ---- saving ----------------------------------------------------------------------------------
    def due(self, step: int, last: bool) -> bool:
        c = self.cfg.checkpoint
        return step % c.save_interval == 0 or step in c.extra_save_steps or last or self.due_now

    def save(self, step: int, consumed: int, final: bool = False) -> None:
        """Save this step, unless its last update was skipped: weights that just gave a non-finite loss are
        never saved (the save is made at the next step that updates). `final` waits for the write."""
        if self.streak:
            self.due_now = not final
            self.log(
                f"step {step:>6} | not saved: the last {self.streak} step(s) were skipped (non-finite loss "
                "or gradient)" + ("" if final else "; saving at the next step that updates")
            )
            return
        if not self.engine.weights_finite():
            raise TrainingError(
                f"the weights hold NaN or inf at step {step}; nothing was saved. "
                f"{self.last_good()} Fix: lower optim.lr, or clip gradients (optim.clip_grad > 0)"
            )
        self.finish()  # one save in flight at a time
        c = self.cfg.checkpoint
        out = save_checkpoint(
            self.root,
            step,
            self.engine,
            {"consumed_samples": consumed},
            self.config_text,
            c.keep_last,
            self.verified,
            async_save=c.async_save and not final,
            retain=set(c.extra_save_steps),
        )
        self.saved, self.due_now = step, False
        if isinstance(out, Path):
            self.log(f"saved checkpoint {out}")
        else:
            self.pending = out

    def poll(self) -> None:
        """Per rank, between steps: publish an async save once its write is done (rank 0 renames)."""
        if self.pending is not None and self.pending.done():
            self.finish(collective=False)

    def finish(self, collective: bool = True) -> None:
        if self.pending is not None:
            path = self.pending.complete(self.verified)
            self.pending = None
            self.log(f"saved checkpoint {path} (written in the background)")
        if collective and self.ctx.world > 1:
            torch.distributed.barrier()

    def last_good(self) -> str:
        good = newest_verified(self.root, self.verified)
        if good is None:
            return "No checkpoint known to train was saved in this run."
        later = [n for n in list_checkpoints(self.root) if n > good]
        if later:
            return (
                f"The last good checkpoint is {self.root / good} (the later {', '.join(later)} may hold the "
                f"same broken weights); to resume from it, write its name into {self.root / LATEST} "
                f"({point_latest(self.root, good)})."
            )
        return f"The last good checkpoint is {self.root / good}; run again to resume from it."
