"""Knowledge distillation (train.distill_from): a frozen teacher's logits become the student's targets.

The use it was built for is a speculative-decoding draft (inference/speculative.py): a draft trained to match
its target's distribution proposes what the target would pick more often than one trained on the data alone.
The teacher is any checkpoint this project saved, under any layout; it is loaded whole on every rank and runs
forward only, in the student's autocast, once per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, load_config
from ..config.schema import check_backend_device
from ..data.tokenizer import load_tokenizer, same_vocabulary
from ..model.attention import prepare_batch
from ..parallel.parallelize import compile_blocks
from ..checkpoint import CheckpointError, load_weights, resolve_checkpoint


class Teacher:
    def __init__(self, cfg: Config, tokenizer, device: torch.device):
        t = cfg.train
        try:
            path = resolve_checkpoint(t.distill_from)
        except CheckpointError as e:
            raise ConfigError(
                "train.distill_from",
                t.distill_from,
                str(e).split(". Fix:")[0],
                "pass the teacher's run dir, checkpoints dir or step_* dir",
            ) from None
        self.cfg = tcfg = load_config(path / "config.yaml")
        _check_vocabulary(cfg, tcfg, tokenizer)
        if tcfg.model.max_position_embeddings < cfg.data.seq_len:
            raise ConfigError(
                "train.distill_from",
                t.distill_from,
                f"is a model of {tcfg.model.max_position_embeddings}"
                f" positions, shorter than data.seq_len={cfg.data.seq_len}",
                "distill at a data.seq_len the teacher was built for, or from a longer teacher",
            )
        if tcfg.attention.kind != "dense":  # its backend runs here, on the student's device
            check_backend_device(tcfg.attention.backend, device.type)
        self.model = load_weights(path, tcfg).to(device).requires_grad_(False)
        self.path, self.weight, self.temperature = path, t.distill_weight, t.distill_temperature

    def compile(self) -> None:
        compile_blocks(self.model.blocks(), static_shapes=False)

    def install(self, model) -> None:
        """The student's loss becomes distillation's for TeacherTargets (validation keeps its own)."""
        model.loss = DistillationLoss(model.loss, model.vocab_size)

    def targets(self, tokens: torch.Tensor, labels: torch.Tensor) -> TeacherTargets:
        return TeacherTargets(labels, lambda: self.logits(tokens), self.weight, self.temperature)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        # the teacher's own attention (kind, windows)
        batch = prepare_batch(self.cfg, tokens, self.model.sep_ids)
        return self.model(tokens, batch=batch)

    def describe(self) -> str:
        m = self.cfg.model
        return (
            f"distilling from {self.path} ({m.family}, {m.num_layers} layers, {self.model.num_params() / 1e6:.2f}M "
            f"parameters, attention {self.cfg.attention.kind}): loss = {self.weight:g} x T^2 KL(teacher || "
            f"student) at T={self.temperature:g}"
            + (f" + {1 - self.weight:g} x cross-entropy" if self.weight < 1 else "")
        )


def _check_vocabulary(cfg: Config, tcfg: Config, tokenizer) -> None:
    """Same token ids: the KL compares distributions over them."""
    theirs, ours = tcfg.model.vocab_size, cfg.model.vocab_size
    same = theirs == ours
    if same and tokenizer is not None and tcfg.data.tokenizer:
        try:
            other = load_tokenizer(tcfg.data.tokenizer)
        except Exception:  # moved or deleted since: the sizes are all there is to compare
            other = None
        if other is not None:
            same = same_vocabulary(other, tokenizer)
    if not same:
        raise ConfigError(
            "train.distill_from",
            cfg.train.distill_from,
            f"is a model of another vocabulary ({theirs} tokens, tokenizer {tcfg.data.tokenizer}) "
            f"than this run's ({ours} tokens, tokenizer {cfg.data.tokenizer})",
            "distill from a model trained with this run's data.tokenizer",
        )


@dataclass
class TeacherTargets:
    """A micro-batch's labels plus its teacher : the head's loss becomes distillation's.
    The teacher's logits are computed when the loss needs them, so one micro-batch's are in memory at a time."""

    labels: torch.Tensor
    teacher_logits: Callable[[], torch.Tensor]  # () -> [b, s, vocab]
    weight: float  # share of the distillation term; the rest is cross-entropy on the labels
    temperature: float


def distill_loss(logits: torch.Tensor, targets: TeacherTargets) -> torch.Tensor:
    """(1 - w) CE(labels) + w T^2 KL(softmax(teacher / T) || softmax(student / T)), means over tokens (Hinton
    et al. 2015). The forward KL is what DistillSpec (Zhou et al. 2023) found to raise a draft's acceptance.
    T^2 keeps the gradient's scale independent of T."""
    v, w, t = logits.shape[-1], targets.weight, targets.temperature
    student = logits.float().reshape(-1, v)
    with torch.no_grad():
        teacher = F.log_softmax(targets.teacher_logits().float().reshape(-1, v) / t, -1)
    loss = (
        w
        * t
        * t
        * F.kl_div(F.log_softmax(student / t, -1), teacher, log_target=True, reduction="batchmean")
    )
    if w < 1:
        loss = loss + (1 - w) * F.cross_entropy(student, targets.labels.reshape(-1))
    return loss


class DistillationLoss:
    """The model's loss while distilling: TeacherTargets get distillation's, plain labels (validation) the
    loss it had before."""

    def __init__(self, base, vocab_size: int):
        self.base, self.vocab_size = base, vocab_size

    def __call__(self, head, x: torch.Tensor, labels) -> torch.Tensor:
        if isinstance(labels, TeacherTargets):  # the logits are needed whole
            return distill_loss(head(x)[..., : self.vocab_size], labels)
        return self.base(head, x, labels)
