"""The training loop: data, model, optimizer, schedule, eval, checkpoints, signals, logging."""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, config_to_dict, dump_config
from ..config.schema import check_backend_device
from ..data.dataset import check_token_range, run_datasets, sample_batch
from ..data.tokenizer import load_tokenizer
from ..data.separators import resolve_separator_ids
from ..model import build_model
from ..model.attention import attention_stats, prepare_batch, sep_inputs
from ..parallel import init_parallel, shutdown
from ..engine import build_engine
from ..parallel import fp8
from ..parallel.parallelize import compile_blocks, parallelize
from ..checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, newest_verified, prune,
                         resolve_checkpoint, save_checkpoint)
from .distill import Teacher
from .metrics import (FLOPS_CONVENTION, MetricsLogger, flops_per_token, format_step, matmul_params, peak_flops,
                      peak_memory_gb)
from .optim import lr_at
from .run_lock import RunLock, RunLockedError


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, ...); the message names the last good checkpoint."""


def pick_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", want, "no CUDA device is visible", "use auto or cpu")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, log: bool = True):
        self.cfg = cfg
        _absolute_paths(cfg)  # the saved config then works from any directory (export-hf, generate)
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if cfg.parallel.engine == "deepspeed":  # missing: one line naming the install, before any work
            from ..engine.deepspeed import import_deepspeed
            import_deepspeed()
        self.ctx = init_parallel(cfg, pick_device(cfg))
        self.device = self.ctx.device
        if cfg.attention.kind != "dense":  # train.device auto: known only now, still before any work
            check_backend_device(cfg.attention.backend, self.device.type)
        if cfg.train.precision == "fp8":
            fp8.check_device(self.device)
            fp8.check_shapes(cfg)
            fp8.torchao_float8()
            if cfg.train.compile and cfg.model.kernels == "auto":  # inductor fuses its norms with the fp8 casts
                cfg.model.kernels = "reference"
        self.stop_signal, self.saving, self.interrupt_after_save = None, False, False
        seed_everything(cfg.train.seed)  # the same on every rank: each takes its slice of one model

        t, m = cfg.train, cfg.model
        self.global_batch = t.global_batch_size or t.micro_batch_size
        if cfg.data.mock:
            if m.vocab_size is None:
                raise ConfigError("model.vocab_size", None, "is needed with data.mock (there is no tokenizer)",
                                  "set model.vocab_size, e.g. 32000")
            self.tokenizer = None
        else:
            self.tokenizer = self._load_tokenizer()
        self.train_ds, self.valid_ds = run_datasets(cfg)
        if not cfg.data.mock:
            check_token_range(cfg.data.paths, m.vocab_size)
        self.notes = self._resolve_attention()
        self.config_text = dump_config(cfg)
        if self.valid_ds is None:
            raise ConfigError("data.split", cfg.data.split, "the validation split holds no documents",
                              "give the valid share (second entry) a positive value, e.g. [0.98, 0.01, 0.01]")

        model = build_model(cfg)
        self.matmul_params = matmul_params(model)  # of the whole model, before sharding (for MFU)
        self.num_params = model.num_params()  # of the whole model, before sharding
        part = parallelize(model, cfg, self.ctx)
        self.notes += part.notes
        self.engine = build_engine(part, cfg, self.ctx)
        self.model = self.engine.model
        if cfg.parallel.engine == "deepspeed":
            self.notes.append("deepspeed config (generated from this config; parallel.deepspeed overrides keys): "
                              + self.engine.config_json())
        self.step, self.consumed, self.saved_step = 0, 0, None
        # verified_step: the newest step whose weights gave a finite loss (the next step updated, or its
        # evaluation was finite); streak: steps skipped in a row; pending: an async save being written
        self.verified_step, self.streak, self.pending, self.save_due = None, 0, None, False
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" and t.precision in ("auto", "bf16", "fp8")
                         else contextlib.nullcontext())
        # SUBLLM's top-k gives each level a fixed length in training: one static graph per length (automatic
        # dynamic shapes cost it ~10% of its speed); evaluation keeps score > 0, a new length each batch, so it
        # runs eager (self.eval_stance)
        self.static_levels = cfg.model.subsampled and not cfg.model.subsample_causal
        if t.compile:
            compile_blocks(part.blocks, static_shapes=self.static_levels)

        self.teacher = Teacher(cfg, self.tokenizer, self.device) if t.distill_from else None
        if self.teacher is not None:
            self.teacher.install(self.model)
            self.notes.append(self.teacher.describe())
            if t.compile:
                self.teacher.compile()
        self.peak, self.peak_source = peak_flops(cfg, self.device)  # per device; None: no MFU
        self.log_enabled = log and self.ctx.is_logging_rank
        self.logger = MetricsLogger(cfg, self.run_dir, {}, enabled=False)  # opened by run(), under the run lock
        self.skipped = 0

    def _load_tokenizer(self):
        cfg, m = self.cfg, self.cfg.model
        if not cfg.data.tokenizer:
            raise ConfigError("data.tokenizer", None, "no tokenizer given",
                              "set data.tokenizer to a sentencepiece .model or tokenizer.json (or data.mock)")
        if not cfg.data.paths:
            raise ConfigError("data.paths", [], "no training data given",
                              "list .bin/.idx prefixes made by `megatron-sep preprocess` (or data.mock)")
        tok = load_tokenizer(cfg.data.tokenizer)
        if m.vocab_size is None:
            m.vocab_size = tok.vocab_size
        elif m.vocab_size < tok.vocab_size:
            raise ConfigError("model.vocab_size", m.vocab_size, f"is smaller than the tokenizer's {tok.vocab_size} "
                              "tokens", "raise it or leave it null")
        return tok

    def _resolve_attention(self) -> list[str]:
        """Turn separator strings into ids (written back into the config) and fill eod_id."""
        a, tok, notes = self.cfg.attention, self.tokenizer, []
        if tok is None:  # data.mock: ids only
            strings = [x for x in a.separators if isinstance(x, str)] if a.kind == "sepllm" else []
            if strings:
                raise ConfigError("attention.separators", strings, "are strings, and data.mock has no tokenizer "
                                  "to resolve them", "list token ids instead, e.g. [13, 15, 30]")
            if a.reset_per_document and a.eod_id is None:
                raise ConfigError("attention.eod_id", None, "is needed for reset_per_document with data.mock",
                                  "set attention.eod_id")
        if a.kind == "sepllm":
            strings = [x for x in a.separators if isinstance(x, str)]
            ids, warnings = resolve_separator_ids(tok, strings) if strings else ([], [])
            ids += [x for x in a.separators if isinstance(x, int) and x not in ids]
            notes += [f"warning: {w}" for w in warnings]
            bad = [i for i in ids if not 0 <= i < self.cfg.model.vocab_size]
            if bad or not ids:
                raise ConfigError("attention.separators", a.separators,
                                  f"resolve to no usable token ids (out of range: {bad})",
                                  "list strings the tokenizer has as single tokens, or valid ids")
            a.separators = sorted(ids)
            shown = ", ".join(f"{i} {tok.id_to_piece(i)!r}" if tok else str(i) for i in a.separators[:32])
            more = f", ... ({len(a.separators)} ids)" if len(a.separators) > 32 else ""
            notes.append(f"separator ids: {shown}{more}")
        if a.reset_per_document and a.eod_id is None:
            a.eod_id = tok.eod_id
        return notes

    def _separator_share(self, samples: int = 64) -> float:
        n = min(samples, len(self.train_ds))
        tokens = torch.from_numpy(np.stack([self.train_ds[i] for i in range(n)]))
        return sep_inputs(self.cfg, tokens, self.model.sep_ids.cpu())["is_sep"].float().mean().item()

    # ---- state ---------------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        c = self.cfg.checkpoint
        if not c.resume and list_checkpoints(self.ckpt_dir):
            raise ConfigError("checkpoint.resume", False, f"{self.ckpt_dir} holds checkpoints of an earlier run, "
                              "which this run would overwrite and rotate out", "use a new train.run_dir, or "
                              "resume (checkpoint.resume=true)")
        path = latest_checkpoint(self.ckpt_dir) if c.resume else None
        if path is not None:
            meta = load_checkpoint(path, self.engine)
            self.step, self.consumed = meta["step"], meta["consumed_samples"]
            self.verified_step = meta.get("verified_step")
            self.saved_step = self.step  # the state on disk: stopping before a new step saves nothing
            self.logger.print(f"resumed from {path} at step {self.step} ({self.consumed} samples consumed)")
        elif c.load:
            path = resolve_checkpoint(c.load)
            load_checkpoint(path, self.engine, with_optimizer=False)
            self.logger.print(f"initialised weights from {path}")
        self.logger.truncate_after(self.step)  # steps logged by a killed run after its last save run again

    def save(self, final: bool = False) -> None:
        """Save this step, unless its last update was skipped: weights that just gave a non-finite loss are
        never saved (the save is made at the next step that updates). `final` waits for the write.
        A second Ctrl-C during the save stops the run right after it."""
        self.saving = True
        try:
            self._save(final)
        finally:
            self.saving = False
        if self.interrupt_after_save:
            raise KeyboardInterrupt

    def _save(self, final: bool) -> None:
        if self.streak:
            self.save_due = not final
            self.logger.print(f"step {self.step:>6} | not saved: the last {self.streak} step(s) were skipped "
                              "(non-finite loss or gradient)" + ("" if final else "; saving at the next step "
                                                                 "that updates"))
            return
        if not self.engine.weights_finite():
            raise TrainingError(f"the weights hold NaN or inf at step {self.step}; nothing was saved. "
                                f"{self._last_good()} Fix: lower optim.lr, or clip gradients (optim.clip_grad > 0)")
        self.finish_pending()  # one save in flight at a time
        meta = {"consumed_samples": self.consumed}
        c = self.cfg.checkpoint
        out = save_checkpoint(self.ckpt_dir, self.step, self.engine, meta, self.config_text, c.keep_last,
                              self.verified_step, async_save=c.async_save and not final)
        self.saved_step, self.save_due = self.step, False
        if isinstance(out, Path):
            self.logger.print(f"saved checkpoint {out}")
        else:
            self.pending = out

    def poll_pending(self) -> None:
        """Per rank, between steps: publish an async save once its write is done (rank 0 renames)."""
        if self.pending is not None and self.pending.done():
            self.finish_pending(collective=False)

    def finish_pending(self, collective: bool = True) -> None:
        if self.pending is not None:
            path = self.pending.complete(self.verified_step)
            self.pending = None
            self.logger.print(f"saved checkpoint {path} (written in the background)")
        if collective and self.ctx.world > 1:
            torch.distributed.barrier()

    def _confirmed(self) -> None:
        """Called after an update: the first one after a save shows the saved weights train, so older
        checkpoints beyond keep_last can go."""
        if self.ctx.rank == 0 and self.pending is None and self.saved_step == self.verified_step:
            prune(self.ckpt_dir, self.cfg.checkpoint.keep_last, self.verified_step)

    def _last_good(self) -> str:
        good = newest_verified(self.ckpt_dir, self.verified_step)
        if good is None:
            return "No checkpoint known to train was saved in this run."
        later = [n for n in list_checkpoints(self.ckpt_dir) if n > good]
        if later:
            return (f"The last good checkpoint is {self.ckpt_dir / good} (the later {', '.join(later)} may hold "
                    f"the same broken weights); to resume from it, write its name into {self.ckpt_dir / 'latest'} "
                    f"(echo {good} > {self.ckpt_dir / 'latest'}).")
        return f"The last good checkpoint is {self.ckpt_dir / good}; run again to resume from it."

    # ---- data ----------------------------------------------------------------------------------
    def batch(self, ds, start: int, size: int):
        return sample_batch(ds, start, size, self.device, self.cfg.model.vocab_size)

    def micro_batch(self, ds, start: int, size: int):
        """(tokens, labels, AttentionBatch): the batch and its plan are built once, here, for every stage."""
        tokens, labels = self.batch(ds, start, size)
        return tokens, labels, prepare_batch(self.cfg, tokens, self.model.sep_ids)

    # ---- steps ---------------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step. Data-parallel rank r takes the r-th slice of the global batch, so the
        samples of a step do not depend on the layout."""
        ctx, mb = self.ctx, self.cfg.train.micro_batch_size
        micros = self.global_batch // (mb * ctx.dp)
        base = self.consumed + ctx.dp_rank * (self.global_batch // ctx.dp)
        self.engine.set_lr(lr_at(self.step, self.cfg))
        self.model.set_train_step(self.step)
        batches = [self.micro_batch(self.train_ds, base + m * mb, mb) for m in range(micros)]
        if self.teacher is not None:  # the loss follows the teacher's logits (validation stays cross-entropy)
            batches = [(tokens, self.teacher.targets(tokens, labels), b) for tokens, labels, b in batches]
        with self.autocast:  # one schedule runs every forward and backward (one stage without pp)
            total = self.engine.forward_backward(batches)
        self.last_batch = batches[-1]
        norm, updated = self.engine.step(loss=total)
        if ctx.grad_size > 1:  # each cp rank has the mean over its slice of the sequence (equal sizes)
            torch.distributed.all_reduce(total, group=ctx.grad_group)
            total /= ctx.grad_size
        if updated:  # the weights this step started from gave a finite loss and gradient
            self.verified_step, self.streak = self.step, 0
        self.step += 1
        self.consumed += self.global_batch
        if updated:
            self._confirmed()
        else:  # every rank agrees: the norm's reduction carries the loss's finiteness
            self.skipped += 1
            self.streak += 1
            if self.skipped > self.cfg.optim.skip_nonfinite:
                raise TrainingError(f"the loss or gradient norm is not finite at step {self.step} (norm "
                                    f"{norm.item()}); the update was dropped and nothing was saved. "
                                    f"{self._last_good()} Fix: lower optim.lr, or let optim.skip_nonfinite "
                                    "skip a few such steps")
            self.logger.print(f"step {self.step:>6} | skipped: non-finite loss or gradient norm "
                              f"({self.skipped} of optim.skip_nonfinite={self.cfg.optim.skip_nonfinite})")
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
        with self.autocast, torch.no_grad(), self.eval_stance():  # forward-only; the last stage has the loss
            if mine:
                total += self.engine.forward_backward([self.micro_batch(self.valid_ds, i * mb, mb) for i in mine],
                                            forward_only=True).double() * len(mine)
            if pad:  # the other ranks' number of forwards (and collectives); the loss is not counted
                self.engine.forward_backward([self.micro_batch(self.valid_ds, 0, mb)] * pad, forward_only=True)
        if ctx.grad_size > 1:  # the cp ranks of one batch each hold the mean over their slice
            torch.distributed.all_reduce(total, group=ctx.grad_group)
        self.model.train()
        return (total / (self.cfg.train.eval_iters * ctx.cp)).item()

    def eval_stance(self):
        if self.static_levels and self.cfg.train.compile:
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.stop_signal is not None:
            if self.saving:  # inside torch.save it would read as a write error; stop once the save is done
                self.interrupt_after_save = True
                return
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        self.stop_signal = signal.Signals(signum).name

    def _stop_agreed(self) -> bool:
        """Ranks get the preemption signal at slightly different times: stop when any rank has it."""
        if self.ctx.world == 1:
            return self.stop_signal is not None
        flag = torch.tensor([self.stop_signal is not None], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.stop_signal is None:
            self.stop_signal = "peer signal"
        return bool(flag.item())

    def run(self, until: int | None = None) -> dict:
        """Train to train.steps (or stop early after step `until`, saving, as a preemption would)."""
        cfg, t = self.cfg, self.cfg.train
        until = t.steps if until is None else min(until, t.steps)
        lock = self._lock_run_dir()
        try:
            self.logger = MetricsLogger(cfg, self.run_dir, config_to_dict(cfg), enabled=self.log_enabled)
            self.logger.print("resolved config:\n" + self.config_text)
            self.maybe_resume()  # strict: a mismatched checkpoint stops here, before anything is written
            if self.ctx.rank == 0:
                (self.run_dir / "config.yaml").write_text(self.config_text)
                given = self.run_dir / "deepspeed_config.json"  # what DeepSpeed was given (an earlier run's: gone)
                if cfg.parallel.engine == "deepspeed":
                    given.write_text(self.engine.config_json() + "\n")
                else:
                    given.unlink(missing_ok=True)
            if self.step >= t.steps:
                self.logger.print(f"the run is finished: it is at step {self.step} of train.steps={t.steps}. "
                                  "Nothing to do (raise train.steps to train further)")
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

    def _train(self, until: int) -> dict:
        cfg, t = self.cfg, self.cfg.train
        for note in self.notes:
            self.logger.print(note)
        if cfg.attention.kind != "dense":
            self.logger.print(f"attention {cfg.attention.kind}: windows per layer "
                              f"{cfg.attention.layer_windows(cfg.model.num_layers, cfg.data.seq_len)} "
                              f"(None = dense), separator share in the data {self._separator_share():.2%}")
        self.logger.print(f"model: {cfg.model.family}, {self.num_params / 1e6:.2f}M parameters, "
                          f"device {self.device}, layout tp={self.ctx.tp} pp={self.ctx.pp} cp={self.ctx.cp} dp={self.ctx.dp}"
                          f"{self.engine.describe}, "
                          f"{self.global_batch // (t.micro_batch_size * self.ctx.dp)} micro-batches per step")
        peak = f"{self.peak / 1e12:.0f} TFLOP/s per device ({self.peak_source})" \
            if self.peak else f"n/a ({self.peak_source})"
        self.logger.print(f"mfu: {FLOPS_CONVENTION}, over a peak of {peak}")
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        tokens_per_step = self.global_batch * cfg.data.seq_len
        last = {}
        try:
            tic, steps_since, paused = time.perf_counter(), 0, 0.0  # paused: eval and save time, not training
            preempted = self.run_dir / "preempted"
            if self.ctx.rank == 0:
                preempted.unlink(missing_ok=True)
            while self.step < until and not self._stop_agreed():
                loss, norm = self.train_step()
                steps_since += 1
                self.poll_pending()
                si = cfg.attention.stats_interval
                kept = 1.0 if cfg.attention.kind == "dense" else None  # share of causal pairs attended
                if kept is None and si and self.step % si == 0:  # the step's last micro-batch
                    stats = attention_stats(cfg, self.last_batch[2].is_sep)
                    kept = stats["kept_pairs"]
                    self.logger.print(f"step {self.step:>6} | attention kept pairs {stats['kept_pairs']:.1%} "
                                      f"| kept kv {stats['kept_kv']:.1%} | separators {stats['sep_share']:.1%}")
                    self.logger.log(self.step, stats)
                if self.step % cfg.logging.log_interval == 0 or self.step == t.steps:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - tic - paused
                    tps = steps_since * tokens_per_step / dt
                    if kept is None:
                        kept = attention_stats(cfg, self.last_batch[2].is_sep)["kept_pairs"]
                    flops = flops_per_token(cfg, self.matmul_params, kept)
                    last = {"loss": loss.item(), "lr": lr_at(self.step - 1, cfg), "grad_norm": norm.item(),
                            "tokens_per_s": tps, "peak_mem_gb": peak_memory_gb(self.device),
                            "mfu": tps * flops / (self.peak * self.ctx.world) if self.peak else None,
                            "peak_tflops": self.peak / 1e12 if self.peak else None,
                            "flops_per_token": flops, "consumed_samples": self.consumed}
                    self.logger.print(format_step(self.step, t.steps, last))
                    self.logger.log(self.step, last)
                    tic, steps_since, paused = time.perf_counter(), 0, 0.0
                if self.step % t.eval_interval == 0 or self.step == t.steps:
                    t0 = time.perf_counter()
                    val = self.evaluate()
                    if math.isfinite(val):
                        self.verified_step = self.step
                    last["val_loss"] = val
                    self.logger.print(f"step {self.step:>6} | val loss {val:.4f} | val ppl {math.exp(val):.2f}")
                    self.logger.log(self.step, {"val_loss": val, "val_ppl": math.exp(val)})
                    paused += time.perf_counter() - t0
                if self.step % cfg.checkpoint.save_interval == 0 or self.step == t.steps or self.save_due:
                    t0 = time.perf_counter()
                    self.save(final=self.step == t.steps)
                    paused += time.perf_counter() - t0
            if self.stop_signal is not None:
                self.logger.print(f"received {self.stop_signal}: saving at step {self.step} and exiting")
                if self.ctx.rank == 0:  # tells the slurm script to requeue the job
                    preempted.write_text(f"{self.step}\n")
            if self.saved_step != self.step:
                self.save(final=True)
            self.finish_pending()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.logger.close()
            shutdown(self.ctx)
        return {"step": self.step, "stopped_by": self.stop_signal, **last}


def _absolute_paths(cfg: Config) -> None:
    d, c = cfg.data, cfg.checkpoint
    if d.tokenizer:
        d.tokenizer = os.path.abspath(d.tokenizer)
    d.paths = [os.path.abspath(p) for p in d.paths]
    if c.load:
        c.load = os.path.abspath(c.load)
    if cfg.train.distill_from:
        cfg.train.distill_from = os.path.abspath(cfg.train.distill_from)
