"""Knowledge distillation (train.distill_from, training/distill.py, distill_loss), on the CPU.

The loss is checked against the KL and its known gradient on fresh random logits; a distilled student must end
closer to its teacher than the same student trained on the data alone; bad teachers and layouts are refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_sep.config import ConfigError
from megatron_sep.checkpoint import load_model
from megatron_sep.training.distill import TeacherTargets, distill_loss
from megatron_sep.training import Trainer

from ..conftest import tiny_config
from ..dist_utils import run_distributed


@pytest.mark.parametrize("weight,temperature", [(1.0, 1.0), (1.0, 2.0), (0.3, 1.5)])
def test_distill_loss_is_the_tempered_kl_plus_cross_entropy(weight, temperature):
    g = torch.Generator().manual_seed(int(weight * 10 + temperature))
    student = (3 * torch.randn(2, 5, 11, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    loss = distill_loss(student, TeacherTargets(labels, lambda: teacher, weight, temperature))
    p = F.softmax(teacher / temperature, -1)  # the teacher's tempered distribution
    q = F.softmax(student / temperature, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    ce = F.cross_entropy(student.reshape(-1, 11), labels.reshape(-1))
    want = weight * temperature**2 * kl + (1 - weight) * ce
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)  # fp32 sums over 11 terms: ~1e-7
    loss.backward()
    # d(T^2 KL)/d(student) = T (q - p) per token; d(CE) = softmax(student) - onehot; both over 10 tokens
    onehot = F.one_hot(labels, 11).float()
    grad = (weight * temperature * (q - p) + (1 - weight) * (F.softmax(student, -1) - onehot)) / 10
    torch.testing.assert_close(student.grad, grad.detach(), rtol=1e-4, atol=1e-6)


def kl_per_token(student, teacher, tokens) -> float:
    with torch.no_grad():
        p = F.log_softmax(teacher(tokens).float(), -1).flatten(0, 1)  # per token
        q = F.log_softmax(student(tokens).float(), -1).flatten(0, 1)
        return F.kl_div(q, p, log_target=True, reduction="batchmean").item()


def test_a_distilled_student_ends_closer_to_its_teacher(corpus, tmp_path, capsys):
    Trainer(
        tiny_config(
            corpus,
            tmp_path / "teacher",
            model={"num_layers": 2, "hidden_size": 64},
            train={"steps": 30},
            checkpoint={"save_interval": 30},
        )
    ).run()
    student = {
        "model": {"num_layers": 1},
        "train": {"steps": 24},
        "checkpoint": {"save_interval": 24},
    }
    Trainer(tiny_config(corpus, tmp_path / "plain", **student)).run()
    capsys.readouterr()
    student["train"].update(distill_from=str(tmp_path / "teacher"))
    Trainer(tiny_config(corpus, tmp_path / "distilled", **student)).run()
    log = capsys.readouterr().out
    assert (
        f"distilling from {tmp_path / 'teacher'}" in log
        and "T^2 KL(teacher || student) at T=1" in log
    )
    teacher, _ = load_model(tmp_path / "teacher")
    plain, _ = load_model(tmp_path / "plain")
    distilled, _ = load_model(tmp_path / "distilled")
    tokens = torch.from_numpy(
        np.fromfile(corpus["prefix"] + ".bin", dtype=np.uint16)[:256].astype(np.int64)
    )
    # same seed, data and steps: only the loss differs, and the distilled student follows the teacher's whole
    # distribution where the plain one sees only the sampled token (measured KL per token: 0.34 against 0.45)
    assert kl_per_token(distilled, teacher, tokens.view(8, 32)) < 0.85 * kl_per_token(
        plain, teacher, tokens.view(8, 32)
    )


def metrics(run_dir, key):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return [r[key] for r in rows if key in r]


def _train_distilled(rank, world, config):
    Trainer(config).run()
    return True


def test_distillation_under_data_parallelism_matches_one_process(corpus, tmp_path):
    """Two gloo ranks, each with half of every global batch and a whole teacher: the KL loss and validation
    loss per step equal one process's to 1e-5 (the all-reduce only reorders fp32 sums)."""
    Trainer(
        tiny_config(
            corpus, tmp_path / "teacher", train={"steps": 4}, checkpoint={"save_interval": 4}
        )
    ).run()
    student = {
        "model": {"num_layers": 1},
        "train": {"steps": 4, "eval_interval": 2, "distill_from": str(tmp_path / "teacher")},
    }
    Trainer(tiny_config(corpus, tmp_path / "one", **student)).run()
    run_distributed(_train_distilled, 2, tiny_config(corpus, tmp_path / "dp2", **student))
    for key in ("loss", "val_loss"):
        one, dp2 = metrics(tmp_path / "one", key), metrics(tmp_path / "dp2", key)
        assert len(one) == len(dp2) > 0
        assert max(abs(a - b) for a, b in zip(one, dp2)) < 1e-5, (key, one, dp2)


def test_bad_teachers_and_layouts_are_refused(corpus, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"train.distill_from.*holds no checkpoint.*Fix: pass the teacher's run dir",
    ):
        Trainer(
            tiny_config(corpus, tmp_path / "s", train={"distill_from": str(tmp_path / "nowhere")})
        )
    Trainer(
        tiny_config(
            corpus,
            tmp_path / "wide",
            model={"vocab_size": 400},
            train={"steps": 1},
            checkpoint={"save_interval": 1},
        )
    ).run()
    with pytest.raises(
        ConfigError, match=r"another vocabulary \(400 tokens.*than this run's \(384 tokens"
    ):
        Trainer(tiny_config(corpus, tmp_path / "s", train={"distill_from": str(tmp_path / "wide")}))
    with pytest.raises(
        ConfigError, match=r"a model of 64 positions, shorter than data.seq_len=128"
    ):
        Trainer(
            tiny_config(
                corpus,
                tmp_path / "s",
                model={"max_position_embeddings": 128, "vocab_size": 400},
                data={"seq_len": 128},
                train={"distill_from": str(tmp_path / "wide")},
            )
        )
    for section, values, key in (
        ("parallel", {"tp": 2}, "parallel.tp"),
        ("parallel", {"pp": 2}, "parallel.pp"),
        ("train", {"distill_weight": 0.0}, "train.distill_weight"),
        ("train", {"distill_temperature": -1.0}, "train.distill_temperature"),
    ):
        sections = {"train": {"distill_from": str(tmp_path / "wide")}}
        sections.setdefault(section, {}).update(values)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            tiny_config(corpus, tmp_path / "s", **sections)
