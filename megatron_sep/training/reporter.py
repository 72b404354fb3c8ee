"""The step log: attention statistics, loss, lr, gradient norm, tokens/s, MFU and memory, every
logging.log_interval steps (and at the last), measured over training time only (eval and saves excluded);
then the time of day, the wall time this process has trained and the estimated time left."""

from __future__ import annotations

import time

import torch

from ..config import Config
from ..model.attention import attention_stats
from .metrics import flops_per_token, format_clock, format_step, peak_memory_gb
from .optim import lr_at


class StepReporter:
    def __init__(self, cfg: Config, run, logger):
        self.cfg, self.logger, self.device = cfg, logger, run.device
        self.matmul_params, self.peak, self.world = run.matmul_params, run.peak, run.ctx.world
        model = run.engine.model
        self.model = getattr(model, "module", model)  # under DeepSpeed, its wrapper's module
        self.tokens_per_step = cfg.train.samples_per_step * cfg.data.seq_len
        self.tic, self.steps, self.paused = time.perf_counter(), 0, 0.0
        self.start, self.first_step = self.tic, None  # for elapsed and eta: this process's steps
        self.last: dict = {}

    def due(self, step: int) -> bool:
        return step % self.cfg.logging.log_interval == 0 or step == self.cfg.train.steps

    def pause(self, seconds: float) -> None:
        """Time the loop spent outside training (evaluation, saves)."""
        self.paused += seconds

    def after_step(self, step: int, loss, norm, is_sep, consumed: int) -> None:
        cfg = self.cfg
        self.steps += 1
        if self.first_step is None:
            self.first_step = step - 1
        si = cfg.attention.stats_interval
        kept = 1.0 if cfg.attention.kind == "dense" else None  # share of causal pairs attended
        if kept is None and si and step % si == 0:  # the step's last micro-batch
            stats = attention_stats(cfg, is_sep)
            kept = stats["kept_pairs"]
            self.logger.print(
                f"step {step:>6} | attention kept pairs {stats['kept_pairs']:.1%} "
                f"| kept kv {stats['kept_kv']:.1%} | separators {stats['sep_share']:.1%}"
            )
            self.logger.log(step, stats)
        if not self.due(step):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        tps = self.steps * self.tokens_per_step / (time.perf_counter() - self.tic - self.paused)
        if kept is None:
            kept = attention_stats(cfg, is_sep)["kept_pairs"]
        concepts = self.concept_stats(step)
        flops = flops_per_token(cfg, self.matmul_params, kept, concepts.get("concept_ratio"))
        self.last = {
            "loss": loss.item(),
            "lr": lr_at(step - 1, cfg),
            "grad_norm": norm.item(),
            "tokens_per_s": tps,
            "peak_mem_gb": peak_memory_gb(self.device),
            "mfu": tps * flops / (self.peak * self.world) if self.peak else None,
            "peak_tflops": self.peak / 1e12 if self.peak else None,
            "flops_per_token": flops,
            "consumed_samples": consumed,
        }
        clock = format_clock(
            time.time(),
            time.perf_counter() - self.start,
            step - self.first_step,
            cfg.train.steps - step,
        )
        self.logger.print(format_step(step, cfg.train.steps, self.last, clock))
        self.logger.log(step, self.last)
        self.tic, self.steps, self.paused = time.perf_counter(), 0, 0.0

    def concept_stats(self, step: int) -> dict:
        """DLCM: the last micro-batch's realised tokens per concept, boundary rate and loss terms, printed
        and logged (nothing for other models)."""
        raw = getattr(self.model, "stats", None)
        if not raw:
            return {}
        stats = {k: v.item() for k, v in raw.items()}
        stats["concept_ratio"] = 1.0 / max(stats["boundary_rate"], 1e-9)
        self.logger.print(
            f"step {step:>6} | concepts: {stats['concept_ratio']:.2f} tokens each "
            f"(target {self.cfg.dlcm.target_ratio:g}) | boundary rate {stats['boundary_rate']:.1%} "
            f"| ce {stats['ce_loss']:.4f} | aux {stats['aux_loss']:.4f}"
        )
        self.logger.log(step, stats)
        return stats
