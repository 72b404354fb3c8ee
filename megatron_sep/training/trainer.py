"""The training loop. `build_run` (build.py) makes what it trains with; the loop runs `train_step` and
`evaluate`, and calls components that decide their own timing: the checkpointer, the step reporter, the
evaluation interval and preemption."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, config_to_dict
from ..data.dataset import run_datasets, sample_batch, sample_rows, to_device
from ..model.attention import kept_count, prepare_batch, sep_inputs
from ..parallel import shutdown
from .build import build_run
from .checkpointer import Checkpointer, TrainingError
from .metrics import FLOPS_CONVENTION, MetricsLogger
from .optim import lr_at
from .prefetch import Prefetcher
from .preemption import Preemption
from .reporter import StepReporter
from .run_lock import RunLock, RunLockedError

__all__ = ["Trainer", "TrainingError"]


class Trainer:
    def __init__(self, cfg: Config, log: bool = True):
        self.run_state = run = build_run(cfg)  # the caller's config is left as it was given
        self.cfg, self.ctx, self.device = run.cfg, run.ctx, run.device
        self.engine, self.model, self.teacher = run.engine, run.model, run.teacher
        self.train_ds, self.valid_ds, self.tokenizer = run.train_ds, run.valid_ds, run.tokenizer
        self.run_dir = Path(self.cfg.train.run_dir)
        t = self.cfg.train
        self.global_batch = t.samples_per_step
        self.step, self.consumed, self.skipped = 0, 0, 0
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda" and t.precision in ("auto", "bf16", "fp8")
            else contextlib.nullcontext()
        )
        self.log_enabled = log and self.ctx.is_logging_rank
        # opened by run(), under the lock
        self.logger = MetricsLogger(self.cfg, self.run_dir, {}, enabled=False)
        self.checkpointer = Checkpointer(
            self.cfg,
            self.run_dir,
            self.engine,
            run.config_text,
            lambda text: self.logger.print(text),
        )
        self.preemption = Preemption(self.ctx)
        # the prefetch thread counts kept keys on the host
        self.host_sep_ids = self.model.sep_ids.cpu()
        self.prefetch = Prefetcher(self.step_rows, self.cfg.data.prefetch)

    @property
    def pending(self):
        """An async save being written (checkpointer.py)."""
        return self.checkpointer.pending

    def resume(self) -> None:
        """Start from this run's latest checkpoint, checkpoint.load's weights, or step 0."""
        self.step, self.consumed = self.checkpointer.resume()
        # a checkpoint saved with a larger global batch consumed more samples than this config sizes for
        need = self.consumed + max(0, self.cfg.train.steps - self.step) * self.global_batch
        if need > len(self.train_ds):
            self.train_ds = run_datasets(self.cfg, need)[0]
        # steps logged by a killed run after its last save run again
        self.logger.resumed_at(self.step)

    def save(self, final: bool = False) -> None:
        with self.preemption.during_save():
            self.checkpointer.save(self.step, self.consumed, final)

    def _separator_share(self, samples: int = 64) -> float:
        n = min(samples, len(self.train_ds))
        tokens = torch.from_numpy(np.stack([self.train_ds[i] for i in range(n)]))
        return (
            sep_inputs(self.cfg, tokens, self.model.sep_ids.cpu())["is_sep"].float().mean().item()
        )

    # ---- data ----------------------------------------------------------------------------------
    def batch(self, ds, start: int, size: int):
        return sample_batch(ds, start, size, self.device, self.cfg.model.vocab_size)

    def micro_batch(self, ds, start: int, size: int):
        """(tokens, labels, AttentionBatch): the batch and its plan are built once, here, for every stage."""
        return self.planned(*self.batch(ds, start, size))

    def planned(self, tokens, labels, max_kept: int | None = None):
        return tokens, labels, prepare_batch(self.cfg, tokens, self.model.sep_ids, max_kept)

    def step_rows(self, consumed: int) -> list[tuple[torch.Tensor, int | None]]:
        """The host rows of this rank's micro-batches of the step that starts at sample `consumed`, each with
        its plan's key-list size counted on the host (so planning syncs nothing): data-parallel rank r takes
        the r-th slice of the global batch (prefetch.py builds these ahead)."""
        ctx, mb = self.ctx, self.cfg.train.micro_batch_size
        base = consumed + ctx.dp_rank * (self.global_batch // ctx.dp)
        pin = self.device.type == "cuda"
        vocab = self.cfg.model.vocab_size
        micros = self.global_batch // (mb * ctx.dp)
        rows = [sample_rows(self.train_ds, base + m * mb, mb, vocab, pin) for m in range(micros)]
        return [(r, kept_count(self.cfg, r[:, :-1], self.host_sep_ids)) for r in rows]

    # ---- steps ---------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step. Data-parallel rank r takes the r-th slice of the global batch, so the
        samples of a step do not depend on the layout."""
        ctx, gb = self.ctx, self.global_batch
        self.engine.set_lr(lr_at(self.step, self.cfg))
        self.model.set_train_step(self.step)
        left = min(self.cfg.data.prefetch, self.cfg.train.steps - self.step - 1)
        ahead = [self.consumed + k * gb for k in range(1, left + 1)]
        rows = self.prefetch.get(self.consumed, ahead)
        batches = [self.planned(*to_device(r, self.device), kept) for r, kept in rows]
        # the loss follows the teacher's logits (validation stays cross-entropy)
        if self.teacher is not None:
            batches = [
                (tokens, self.teacher.targets(tokens, labels), b) for tokens, labels, b in batches
            ]
        with self.autocast:  # one schedule runs every forward and backward (one stage without pp)
            total = self.engine.forward_backward(batches)
        self.last_batch = batches[-1]
        norm, updated = self.engine.step(loss=total)
        # each cp rank has the mean over its slice of the sequence (equal sizes)
        if ctx.grad_size > 1:
            torch.distributed.all_reduce(total, group=ctx.grad_group)
            total /= ctx.grad_size
        self.step += 1
        self.consumed += self.global_batch
        if updated:  # the weights this step started from gave a finite loss and gradient
            self.checkpointer.updated(self.step - 1)
            return total, norm
        self.skipped += 1  # every rank agrees: the norm's reduction carries the loss's finiteness
        self.checkpointer.skipped()
        if self.skipped > self.cfg.optim.skip_nonfinite:
            raise TrainingError(
                f"the loss or gradient norm is not finite at step {self.step} (norm "
                f"{norm.item()}); the update was dropped and nothing was saved. "
                f"{self.checkpointer.last_good()} Fix: lower optim.lr, or let "
                "optim.skip_nonfinite skip a few such steps"
            )
        self.logger.print(
            f"step {self.step:>6} | skipped: non-finite loss or gradient norm "
            f"({self.skipped} of optim.skip_nonfinite={self.cfg.optim.skip_nonfinite})"
        )
        return total, norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over eval_iters fixed validation batches, shared out over the dp ranks. Every dp rank
        runs ceil(eval_iters / dp) forwards: ZeRO-3 gathers the weights inside each forward, so a rank that
        ran fewer (eval_iters < dp, or not a multiple) would leave the others waiting in that gather. A rank
        short of batches repeats batch 0 and drops its loss."""
        self.model.eval()
        ctx, mb, iters = self.ctx, self.cfg.train.micro_batch_size, self.cfg.train.eval_iters
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        mine = range(ctx.dp_rank, iters, ctx.dp)
        pad = -(-iters // ctx.dp) - len(mine)
        run = self.engine.forward_backward
        # forward-only; the last stage has the loss
        with self.autocast, torch.no_grad(), self.eval_stance():
            if mine:
                batches = [self.micro_batch(self.valid_ds, i * mb, mb) for i in mine]
                total += run(batches, forward_only=True).double() * len(mine)
            # the other ranks' number of forwards (and collectives); the loss is not counted
            if pad:
                run([self.micro_batch(self.valid_ds, 0, mb)] * pad, forward_only=True)
        if ctx.grad_size > 1:  # the cp ranks of one batch each hold the mean over their slice
            torch.distributed.all_reduce(total, group=ctx.grad_group)
        self.model.train()
        return (total / (self.cfg.train.eval_iters * ctx.cp)).item()

    def eval_due(self, step: int) -> bool:
        return step % self.cfg.train.eval_interval == 0 or step == self.cfg.train.steps

    def eval_stance(self):
        if self.run_state.static_levels and self.cfg.train.compile:
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    # ---- the run -------------------------------------------------------------------------------
    def run(self, until: int | None = None) -> dict:
        """Train to train.steps (or stop early after step `until`, saving, as a preemption would)."""
        cfg, t = self.cfg, self.cfg.train
        until = t.steps if until is None else min(until, t.steps)
        lock = self._lock_run_dir()
        try:
            self.logger = MetricsLogger(
                cfg, self.run_dir, config_to_dict(cfg), enabled=self.log_enabled
            )
            self.logger.print("resolved config:\n" + self.run_state.config_text)
            self.resume()  # strict: a mismatched checkpoint stops here, before anything is written
            if self.ctx.rank == 0:
                (self.run_dir / "config.yaml").write_text(self.run_state.config_text)
                # what DeepSpeed was given (an earlier run's: gone)
                given = self.run_dir / "deepspeed_config.json"
                text = self.engine.given_config()
                if text is not None:
                    given.write_text(text + "\n")
                else:
                    given.unlink(missing_ok=True)
            if self.step >= t.steps:
                self.logger.print(
                    f"the run is finished: it is at step {self.step} of train.steps={t.steps}. "
                    "Nothing to do (raise train.steps to train further)"
                )
                self.logger.close()
                shutdown(self.ctx)
                return {"step": self.step, "stopped_by": None, "finished_before": True}
            return self._train(until)
        finally:
            lock.release()

    def _lock_run_dir(self) -> RunLock:
        """Rank 0 locks run_dir; every rank learns whether it could."""
        lock = RunLock(self.run_dir)
        error = None
        if self.ctx.rank == 0:
            try:
                lock.acquire()
            except (RunLockedError, OSError) as e:  # OSError: run_dir is a file, read-only, ...
                error = e
        if self.ctx.world > 1:
            flag = torch.tensor([error is not None], dtype=torch.int32, device=self.device)
            torch.distributed.all_reduce(flag)
            if flag.item() and error is None:
                error = RunLockedError(f"rank 0 could not lock {self.run_dir}: another run uses it")
        if error is not None:
            shutdown(self.ctx)
            raise error
        return lock

    def _log_start(self) -> None:
        cfg, t, run = self.cfg, self.cfg.train, self.run_state
        for note in run.notes:
            self.logger.print(note)
        if cfg.attention.kind != "dense":
            self.logger.print(
                f"attention {cfg.attention.kind}: windows per layer "
                f"{cfg.attention.layer_windows(cfg.model.num_layers, cfg.data.seq_len)} "
                f"(None = dense), separator share in the data {self._separator_share():.2%}"
            )
        self.logger.print(
            f"model: {cfg.model.family}{' dlcm' if cfg.model.arch == 'dlcm' else ''}, "
            f"{run.num_params / 1e6:.2f}M parameters, "
            f"device {self.device}, layout tp={self.ctx.tp} pp={self.ctx.pp} cp={self.ctx.cp} "
            f"dp={self.ctx.dp}{self.engine.describe}, "
            f"{self.global_batch // (t.micro_batch_size * self.ctx.dp)} micro-batches per step"
        )
        peak = (
            f"{run.peak / 1e12:.0f} TFLOP/s per device ({run.peak_source})"
            if run.peak
            else f"n/a ({run.peak_source})"
        )
        self.logger.print(f"mfu: {FLOPS_CONVENTION}, over a peak of {peak}")

    def _train(self, until: int) -> dict:
        t, ckpt = self.cfg.train, self.checkpointer
        self._log_start()
        reporter = StepReporter(self.cfg, self.run_state, self.logger)
        try:
            with self.preemption.installed():
                preempted = self.run_dir / "preempted"
                if self.ctx.rank == 0:
                    preempted.unlink(missing_ok=True)
                if (
                    self.step == 0
                    and ckpt.saved is None
                    and 0 in ckpt.cfg.checkpoint.extra_save_steps
                ):
                    self.save()  # the initial weights
                while self.step < until and not self.preemption.stop_agreed():
                    loss, norm = self.train_step()
                    ckpt.poll()
                    reporter.after_step(
                        self.step, loss, norm, self.last_batch[2].is_sep, self.consumed
                    )
                    if self.eval_due(self.step):
                        t0 = time.perf_counter()
                        val = self.evaluate()
                        ckpt.evaluated(self.step, math.isfinite(val))
                        reporter.last["val_loss"] = val
                        self.logger.print(
                            f"step {self.step:>6} | val loss {val:.4f} | val ppl {math.exp(val):.2f}"
                        )
                        self.logger.log(self.step, {"val_loss": val, "val_ppl": math.exp(val)})
                        reporter.pause(time.perf_counter() - t0)
                    if ckpt.due(self.step, last=self.step == t.steps):
                        t0 = time.perf_counter()
                        self.save(final=self.step == t.steps)
                        reporter.pause(time.perf_counter() - t0)
                stop = self.preemption.signal
                if stop is not None:
                    self.logger.print(f"received {stop}: saving at step {self.step} and exiting")
                    if self.ctx.rank == 0:  # tells the slurm script to requeue the job
                        preempted.write_text(f"{self.step}\n")
                if ckpt.saved != self.step:
                    self.save(final=True)
                ckpt.finish()
        finally:
            self.prefetch.close()
            self.logger.close()
            shutdown(self.ctx)
        return {"step": self.step, "stopped_by": self.preemption.signal, **reporter.last}
