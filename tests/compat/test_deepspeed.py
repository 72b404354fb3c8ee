"""parallel.engine: deepspeed (ZeRO-1/2/3, CPU offload) on 2 gloo processes and DeepSpeed's CPU path,
against the native engine in one process, fp32.

Tolerance 1e-4 absolute on the loss (the issue's bound). Only the order of float32 sums differs
(DeepSpeed's reduce-scatter and flat partitions against one process), which moves a loss of ~6 by
about 5e-7 over these 6 steps. One spawned pair of processes runs every DeepSpeed case in turn on one
process group (the Trainer leaves a group it did not start), since DeepSpeed's import and its CPU
communication op's build dominate a spawn.
"""

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install -e '.[deepspeed]'")

from megatron_sep.config import ConfigError  # noqa: E402
from megatron_sep.training import Trainer  # noqa: E402

from ..conftest import tiny_config  # noqa: E402
from ..dist_utils import run_distributed  # noqa: E402

TOL = 1e-4
DS = {"engine": "deepspeed"}
# (run dir, attention kind, parallel section, stop after this step or None)
CASES = [
    ("zero2_dense", "dense", {**DS, "zero": 2}, None),
    ("zero2_sepllm", "sepllm", {**DS, "zero": 2}, None),
    ("zero3_dense", "dense", {**DS, "zero": 3}, None),
    ("zero3_sepllm", "sepllm", {**DS, "zero": 3}, None),
    # offload, and a resume under the same engine: stopped at step 3 (saved), then on in the same run dir
    ("zero3_offload", "sepllm", {**DS, "zero": 3, "offload": "optimizer+params"}, 3),
    ("zero3_offload", "sepllm", {**DS, "zero": 3, "offload": "optimizer+params"}, None),
    # the native engine resumes it
    ("zero1_offload", "sepllm", {**DS, "zero": 1, "offload": "optimizer"}, 3),
    # resumes a native single-process checkpoint
    ("native_to_zero2", "sepllm", {**DS, "zero": 2}, None),
]
CASES_BY_NAME = {name: parallel for name, _, parallel, _ in CASES}


def config(corpus, run_dir, kind, parallel=None, steps=6):
    attention = (
        {"kind": kind, "window": 6, "init_tokens": 2} if kind == "sepllm" else {"kind": "dense"}
    )
    return tiny_config(
        corpus,
        run_dir,
        attention=attention,
        parallel=parallel or {},
        model={"num_layers": 4},
        train={"steps": steps, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 3},
        checkpoint={"save_interval": 3},
    )


def losses(run_dir):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def train(corpus, run_dir, kind, parallel=None, until=None):
    """Run, with the log lines appended to run_dir/stdout.txt (what a resume printed is checked there)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.txt", "a") as f, contextlib.redirect_stdout(f):
        Trainer(config(corpus, run_dir, kind, parallel)).run(until=until)


def _nan_step(corpus, run_dir, zero):
    """One step, then one whose first weight's gradient is NaN on every rank, then one more.
    -> (skipped steps, weights unchanged by the NaN step, next loss)."""
    import torch

    cfg = config(corpus, run_dir, "dense", {**DS, "zero": zero})
    cfg.optim.skip_nonfinite = 1
    trainer = Trainer(cfg)
    trainer.train_step()
    before = [trainer.engine._full(p).clone() for _, p in trainer.engine._named()]
    hook = next(trainer.model.parameters()).register_hook(lambda g: g * float("nan"))
    trainer.train_step()
    hook.remove()
    same = all(
        torch.equal(trainer.engine._full(p), b)
        for (_, p), b in zip(trainer.engine._named(), before)
    )
    return trainer.skipped, same, trainer.train_step()[0].item()


def _deepspeed_cases(rank, world, corpus, root):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name, kind, parallel, until in CASES:
        train(corpus, Path(root) / name, kind, parallel, until)
    nan = {zero: _nan_step(corpus, Path(root) / f"nan_zero{zero}", zero) for zero in (2, 3)}
    dist.destroy_process_group()
    return nan


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Native references in this process, every DeepSpeed case in one spawned pair, then the native resume
    of a DeepSpeed checkpoint. -> {name: run dir}."""
    root = tmp_path_factory.mktemp("deepspeed")
    for kind in ("dense", "sepllm"):
        train(corpus, root / f"native_{kind}", kind)
    train(corpus, root / "native_to_zero2", "sepllm", until=3)  # saved at step 3
    nan = run_distributed(_deepspeed_cases, 2, corpus, str(root), timeout=600)[0]
    train(corpus, root / "zero1_offload", "sepllm")  # native, one process, from step 3
    return {**{p.name: p for p in root.iterdir()}, "nan": nan}


@pytest.mark.parametrize("name", ["zero2_dense", "zero2_sepllm", "zero3_dense", "zero3_sepllm"])
def test_zero_stages_match_one_native_process(runs, name):
    kind = name.split("_")[1]
    got, ref = losses(runs[name]), losses(runs[f"native_{kind}"])
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    assert all(abs(got[s] - ref[s]) < TOL for s in ref), (name, got, ref)


@pytest.mark.parametrize("name", ["zero3_offload", "zero1_offload", "native_to_zero2"])
def test_offload_and_resume_across_engines_match_the_uninterrupted_run(runs, name):
    """zero3_offload: ZeRO-3 with weights and optimizer on the CPU, stopped at step 3 and resumed by DeepSpeed;
    zero1_offload: saved by DeepSpeed, resumed by the native engine in one process; native_to_zero2: saved by
    the native engine, resumed by DeepSpeed ZeRO-2 on 2 processes."""
    got, ref = losses(runs[name]), losses(runs["native_sepllm"])
    assert sorted(got) == list(range(1, 7))
    assert all(abs(got[s] - ref[s]) < TOL for s in ref), (name, got, ref)
    assert "resumed from" in (runs[name] / "stdout.txt").read_text()
    if name != "zero1_offload":  # run by DeepSpeed last: what it was given is next to config.yaml
        given = json.loads((runs[name] / "deepspeed_config.json").read_text())
        assert given["zero_optimization"]["stage"] == CASES_BY_NAME[name]["zero"]


@pytest.mark.parametrize("zero", [2, 3])
def test_a_non_finite_gradient_drops_the_step(runs, zero):
    """DeepSpeed drops the update; the Trainer counts it against optim.skip_nonfinite and trains on."""
    skipped, unchanged, next_loss = runs["nan"][zero]
    assert skipped == 1 and unchanged and math.isfinite(next_loss)


def test_a_kill_during_a_deepspeed_save_keeps_the_last_checkpoint(corpus, runs, tmp_path):
    """One DeepSpeed process (ZeRO-3, the CLI) killed inside its step-6 save, after the tensors are written:
    `latest` stays at step 3, and the native engine resumes from it to the uninterrupted losses."""
    from megatron_sep.config import dump_config
    from megatron_sep.checkpoint import CRASH_ENV, latest_checkpoint

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(dump_config(config(corpus, tmp_path / "run", "sepllm", {**DS, "zero": 3})))
    r = subprocess.run(
        [sys.executable, "-m", "megatron_sep", "train", "-c", str(cfg_file)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, CRASH_ENV: "6"},
    )
    assert r.returncode == 86, r.stderr[-2000:]
    root = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(root).name == "step_00000003" and list(root.glob(".tmp-step_00000006"))
    train(corpus, tmp_path / "run", "sepllm")
    got, ref = losses(tmp_path / "run"), losses(runs["native_sepllm"])
    assert all(abs(got[s] - ref[s]) < TOL for s in ref) and sorted(got) == list(range(1, 7))


def test_export_hf_reads_a_zero3_checkpoint(runs, tmp_path):
    import torch
    import transformers

    from megatron_sep.convert import export_hf
    from megatron_sep.checkpoint import load_model

    ours, _ = load_model(runs["zero3_dense"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export_hf(runs["zero3_dense"], tmp_path / "hf")
    ).eval()
    tokens = torch.randint(0, 384, (2, 20))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "parallel,words",
    [
        ({**DS, "zero": 2, "tp": 2}, "parallel.tp=2"),
        ({**DS, "zero": 2, "pp": 2}, "parallel.pp=2"),
        ({**DS, "zero": 3, "cp": 2}, "parallel.cp=2"),
        ({**DS, "zero": 0}, "plain data parallelism"),
        ({**DS, "zero": 2, "offload": "optimizer+params"}, "needs ZeRO-3"),
        ({"zero": 2}, "engine: deepspeed"),
        ({"offload": "optimizer"}, "engine: deepspeed"),
        ({"deepspeed": {"x": 1}}, "engine is native"),
        (
            {**DS, "zero": 2, "deepspeed": {"train_batch_size": 16}},
            "generated from train.global_batch_size",
        ),
        (
            {**DS, "zero": 2, "deepspeed": {"zero_optimization": {"stage": 1}}},
            "generated from parallel.zero",
        ),
        (
            {**DS, "zero": 2, "deepspeed": {"fp16": {"enabled": True}}},
            "fp16 loss scaling is not offered",
        ),
    ],
)
def test_combinations_the_engines_cannot_serve_are_rejected_at_load(
    corpus, tmp_path, parallel, words
):
    with pytest.raises(ConfigError, match="Fix:") as e:
        config(corpus, tmp_path, "sepllm", parallel)
    assert words in str(e.value)
    with pytest.raises(ConfigError, match="fp8"):
        tiny_config(corpus, tmp_path, parallel={**DS, "zero": 2}, train={"precision": "fp8"})


def test_generated_config_and_expert_overrides():
    from megatron_sep.config import config_from_dict
    from megatron_sep.engine.deepspeed import ds_config

    cfg = config_from_dict(
        {
            "parallel": {
                **DS,
                "zero": 3,
                "offload": "optimizer",
                "deepspeed": {"zero_optimization": {"overlap_comm": True}, "dump_state": True},
            },
            "train": {"micro_batch_size": 2, "global_batch_size": 16},
            "optim": {"clip_grad": 0.5},
        }
    )
    out = ds_config(cfg, dp=2, bf16=True)
    assert out["gradient_accumulation_steps"] == 4 and out["train_batch_size"] == 16
    assert (
        out["zero_optimization"]["stage"] == 3 and out["zero_optimization"]["overlap_comm"] is True
    )
    assert (
        out["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        and "offload_param" not in out["zero_optimization"]
    )
    assert out["gradient_clipping"] == 0.5 and out["bf16"]["enabled"] and out["dump_state"] is True


def _cli_train(corpus, tmp_path, parallel, hide_deepspeed=False):
    """The CLI as a user runs it, in a child process; DeepSpeed unimportable there when asked."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model": {"num_layers": 2, "hidden_size": 32, "num_heads": 4},
                "data": {
                    "tokenizer": str(corpus["tokenizer"]),
                    "paths": [corpus["prefix"]],
                    "seq_len": 32,
                },
                "parallel": parallel,
                "train": {"run_dir": str(tmp_path / "run"), "device": "cpu"},
            }
        )
    )
    hide = "sys.modules['deepspeed'] = None; " if hide_deepspeed else ""
    code = f"import sys; {hide}from megatron_sep.cli import main; sys.exit(main(['train', '--config', {str(cfg)!r}]))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_missing_deepspeed_is_one_line_naming_the_install(corpus, tmp_path):
    r = _cli_train(corpus, tmp_path, {**DS, "zero": 2}, hide_deepspeed=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "pip install -e '.[deepspeed]'" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_key_deepspeed_rejects_is_one_line_naming_it(corpus, tmp_path):
    """DeepSpeed validates its JSON itself (pydantic); a misspelt nested key comes back as one config error."""
    r = _cli_train(
        corpus,
        tmp_path,
        {**DS, "zero": 2, "deepspeed": {"zero_optimization": {"overlap_com": True}}},
    )
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert (
        line.startswith(
            "error: config error: parallel.deepspeed.zero_optimization.overlap_com=True: "
            "DeepSpeed rejects it"
        )
        and "Fix:" in line
    ), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
