"""Step log lines, metrics.jsonl, and optional TensorBoard / wandb sinks; FLOPs for MFU."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import secrets
import sys
import time
from pathlib import Path

import torch

from ..config import Config
from ..config.structure import block_shares, parse_structure
from ..errors import ConfigError, first_line
from ..model.gpt import padded_vocab

# Dense peaks (TFLOP/s) for MFU when logging.peak_tflops is unset: bf16, and fp8 where the chip has it.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0},
    "A100": {"bf16": 312.0},
    "L40S": {"bf16": 362.0, "fp8": 733.0},
    "A10G": {"bf16": 125.0},
}


FLOPS_CONVENTION = (
    "6 x matmul params + 12 x layers x hidden x seq x kept-pair share FLOPs per token (PaLM's "
    "count; sparse attention counts only the causal pairs it computes; SUBLLM blocks count at their level's "
    "share of the tokens; DLCM's backbone at its realised concepts per token)"
)


def matmul_params(model) -> int:
    """Parameters that take part in matmuls (>= 2-D, not the embedding); the LM head counts, tied or not."""
    return sum(
        p.numel()
        for n, p in model.named_parameters(remove_duplicate=False)
        if p.dim() >= 2 and "embed" not in n
    )


def flops_per_token(
    cfg: Config, n_matmul_params: int, kept_pairs: float = 1.0, ratio: float | None = None
) -> float:
    """Training FLOPs per token (FLOPS_CONVENTION): 6N for the weight matmuls plus 12*L*h*s for attention
    scores and values, dense at full s as PaLM and Megatron count it, scaled for SepLLM-style attention by
    the share of causal (query, key) pairs it keeps. SUBLLM: a block at a level keeping share r of the tokens
    does r of its matmuls and r^2 of its attention per token (its sequence is r times shorter)."""
    m = cfg.model
    if m.arch == "dlcm":
        return dlcm_flops_per_token(cfg, ratio or cfg.dlcm.target_ratio, kept_pairs)
    attention = 12.0 * m.hidden_size * cfg.data.seq_len * kept_pairs
    if not m.subsampled:
        return 6.0 * n_matmul_params + m.num_layers * attention
    shares = block_shares(parse_structure(m.structure, m.num_layers), m.level_keeps())
    head = padded_vocab(m.vocab_size) * m.hidden_size
    per_block = (
        n_matmul_params - head
    ) / m.num_layers  # the scorers' few weights count with the blocks
    return 6.0 * (head + per_block * sum(shares)) + attention * sum(r * r for r in shares)


def block_matmuls(m) -> int:
    """Weights of one block's matmuls (qkv, out, MLP)."""
    qkv = m.hidden_size * (m.num_heads + 2 * m.kv_heads) * m.head_dim
    mlp = (3 if m.parts.mlp == "swiglu" else 2) * m.hidden_size * m.ffn_size
    return qkv + m.num_heads * m.head_dim * m.hidden_size + mlp


def dlcm_flops_per_token(cfg: Config, ratio: float, kept_pairs: float = 1.0) -> float:
    """DLCM, each stack at its length: per token the token layers, router, cross-attention projections and
    head; per concept (1/ratio of the tokens) the up projection and the backbone. Attention: the token layers
    at seq_len (times the kept share), the backbone at seq_len / ratio concepts, and each decoder layer's
    cross-attention over the concepts a token sees (half of them on average)."""
    m, d, s = cfg.model, cfg.dlcm, cfg.data.seq_len
    h, hc, dec = m.hidden_size, d.concept_hidden_size, m.num_layers - d.encoder_layers
    cross = 2 * m.num_heads * m.head_dim * h + 2 * hc * m.kv_heads * m.head_dim
    router = 0 if d.boundary == "fixed" else 2 * h * h
    token = m.num_layers * block_matmuls(m) + padded_vocab(m.vocab_size) * h + router + dec * cross
    concept = d.concept_layers * block_matmuls(d.backbone(m)) + h * hc
    attention = (
        m.num_layers * 12.0 * h * s * kept_pairs
        + d.concept_layers * 12.0 * hc * s / ratio**2
        + dec * 6.0 * h * s / ratio
    )
    return 6.0 * (token + concept / ratio) + attention


def peak_flops(cfg: Config, device: torch.device) -> tuple[float | None, str]:
    """Peak FLOP/s per device for MFU, and where it came from."""
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * 1e12, "logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        # fp8 runs are measured against the fp8 peak
        kind = "fp8" if cfg.train.precision == "fp8" else "bf16"
        for key, peaks in PEAK_TFLOPS.items():
            if key in name and kind in peaks:
                return peaks[kind] * 1e12, f"{key} {kind} dense, by device name"
        return None, f"unknown device {name!r}: set logging.peak_tflops"
    return None, "no GPU: set logging.peak_tflops for an MFU on this device"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    def __init__(self, cfg: Config, run_dir: Path, config_dict: dict, enabled: bool = True):
        self.enabled = enabled
        self.tb = self.wandb = None
        self.tb_dir = run_dir / "tensorboard" if cfg.logging.tensorboard else None
        if not enabled:
            return
        # checked before metrics.jsonl is opened: a missing package writes nothing here
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (opened by resumed_at)
            except ImportError as e:
                raise ConfigError(
                    "logging.tensorboard",
                    True,
                    f"needs tensorboard, which cannot be imported ({first_line(e)})",
                    "pip install -e '.[tensorboard]', or set logging.tensorboard: false",
                ) from None
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.jsonl = open(self.path, "a", buffering=1)
        if cfg.logging.wandb:
            import wandb

            # one wandb run per run_dir: a resume or a requeue appends to it instead of starting another
            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                dir=str(run_dir),
                mode=cfg.logging.wandb_mode,
                config=config_dict,
                name=run_dir.name,
                id=wandb_id(run_dir),
                resume="allow",
            )

    def resumed_at(self, step: int) -> None:
        """On resume: drop the records of steps after the checkpoint (their run was killed before saving
        them, and they are about to be run again), and a line cut short by the kill; TensorBoard hides its
        events of those steps (purge_step) so no step plots twice."""
        if not self.enabled:
            return
        self.jsonl.close()
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if kept != lines:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
        self.jsonl = open(self.path, "a", buffering=1)
        if self.tb_dir is not None and self.tb is None:
            self.tb = _summary_writer(self.tb_dir, purge_step=step + 1)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _json_number(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tb is None and self.tb_dir is not None:  # logged without resumed_at: a fresh start
            self.tb = _summary_writer(self.tb_dir)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True, file=sys.stdout)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_id(run_dir: Path) -> str:
    """The run_dir's wandb run id: made on the first start, read back by every later one."""
    path = run_dir / "wandb_id"
    if path.is_file():
        run_id = path.read_text().strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):  # a file we read: data, checked
            raise ConfigError(
                "logging.wandb",
                True,
                f"{path} holds no wandb run id ({run_id[:40]!r})",
                "delete the file to start a new wandb run for this run_dir",
            )
        return run_id
    run_id = secrets.token_hex(6)  # wandb ids: letters and digits
    path.write_text(run_id + "\n")
    return run_id


def _summary_writer(log_dir: Path, purge_step: int | None = None):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _json_number(v):
    """NaN and inf are not JSON: metrics.jsonl holds null for them, so every line parses anywhere."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def format_step(step: int, total: int, m: dict, clock: str = "") -> str:
    mfu = f"{m['mfu']:.1%} of {m['peak_tflops']:.0f} TF/s" if m.get("mfu") is not None else "n/a"
    return (
        f"step {step:>6}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | grad norm "
        f"{m['grad_norm']:.3f} | {m['tokens_per_s']:,.0f} tok/s | mfu {mfu} | "
        f"mem {m['peak_mem_gb']:.2f} GB" + (f" | {clock}" if clock else "")
    )


def format_clock(now: float, elapsed: float, done: int, left: int) -> str:
    """'12-07 10:31:05 | elapsed 1h02m | eta 3h10m': the time of day, the wall time since this process
    started training, and the steps left at its rate so far (evaluations and saves included: they recur)."""
    eta = f" | eta {format_duration(elapsed / done * left)}" if done and left else ""
    return (
        time.strftime("%m-%d %H:%M:%S", time.localtime(now))
        + f" | elapsed {format_duration(elapsed)}{eta}"
    )


def format_duration(seconds: float) -> str:
    """45s, 12m05s, 1h02m, 2d03h."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
