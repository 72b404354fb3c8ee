"""DLCM through the Trainer: the realised compression moves toward the target, a stop and resume give the
uninterrupted losses bit for bit, and tp2 / dp2 (gloo) match one process; generation from its checkpoint."""

import json
from pathlib import Path

import pytest

from megatron_sep.config import ConfigError
from megatron_sep.training import Trainer

from ..conftest import tiny_config
from ..dist_utils import run_distributed, train_layouts

DLCM = {"arch": "dlcm", "num_layers": 3}
STACKS = {
    "encoder_layers": 2,
    "concept_layers": 2,
    "concept_hidden_size": 48,
    "concept_heads": 4,
    "concept_kv_heads": 2,
}


def _config(corpus, run_dir, parallel=None, dlcm=None, **sections):
    return tiny_config(
        corpus,
        run_dir,
        model=DLCM,
        dlcm={**STACKS, **(dlcm or {})},
        parallel=parallel or {},
        attention={"kind": "sepllm", "window": 6, "init_tokens": 2},
        **{
            "train": {
                "steps": 6,
                "micro_batch_size": 2,
                "global_batch_size": 4,
                "eval_interval": 3,
            },
            "checkpoint": {"save_interval": 3},
            **sections,
        },
    )


def metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def test_realised_ratio_moves_toward_the_target(corpus, tmp_path):
    """The router starts near one boundary in two tokens (W_q = W_k = I); the compression loss alone moves
    it toward 1 in 4 over 40 steps, and the step log reports it."""
    cfg = _config(
        corpus,
        tmp_path / "run",
        dlcm={"aux_weight": 1.0, "target_ratio": 4.0},
        train={"steps": 40, "micro_batch_size": 4, "global_batch_size": 4, "eval_interval": 40},
        optim={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2},
        checkpoint={"save_interval": 40},
    )
    Trainer(cfg).run()
    rows = [r for r in metrics(tmp_path / "run") if "concept_ratio" in r]
    first, last = rows[0]["concept_ratio"], rows[-1]["concept_ratio"]
    assert len(rows) == 40 and first < 2.5 and last > first + 1.0, (first, last)
    assert abs(last - 4.0) < abs(first - 4.0)


LAYOUTS = {
    "tp2": {"tp": 2},
    "dp2": {},
    "dp2_zero1": {"zero": 1},
    "dp2_fsdp2": {"engine": "fsdp2"},
    "dp2_deepspeed_zero3": {"engine": "deepspeed", "zero": 3},
}  # the last: with DeepSpeed installed
try:
    import deepspeed  # noqa: F401
except ImportError:
    LAYOUTS.pop("dp2_deepspeed_zero3")


def test_resumes_and_matches_under_parallel_layouts(corpus, tmp_path):
    """A stop at step 3 and a resume give the uninterrupted losses bit for bit; tp2 (all three stacks and
    the cross-attention split, router and pooling replicated) matches one process with the same two
    micro-batches per step, and dp2 (the global parser's G and F summed over the two ranks, its gradient
    too), with ZeRO-1, FSDP2 and DeepSpeed ZeRO-3 too, matches one process with one micro-batch of both ranks'
    samples, within
    1e-5 (fp32; only the order of sums differs). A parser reduced per rank would not: it moves the loss
    by ~1e-4 within two steps."""
    Trainer(_config(corpus, tmp_path / "ref")).run()
    whole = {"steps": 6, "micro_batch_size": 4, "global_batch_size": 4, "eval_interval": 3}
    Trainer(_config(corpus, tmp_path / "ref_whole", train=whole)).run()
    Trainer(_config(corpus, tmp_path / "resumed")).run(until=3)
    Trainer(_config(corpus, tmp_path / "resumed")).run()
    run_distributed(train_layouts, 2, _config, corpus, str(tmp_path), LAYOUTS)
    ref = losses(tmp_path / "ref")
    assert sorted(ref) == list(range(1, 7)) and ref[6] < ref[1]
    assert losses(tmp_path / "resumed") == ref
    for name in LAYOUTS:
        base = "ref" if name == "tp2" else "ref_whole"
        want, got = losses(tmp_path / base), losses(tmp_path / name)
        assert all(abs(got[s] - want[s]) < 1e-5 for s in want), (name, got, want)
        rates = [r["boundary_rate"] for r in metrics(tmp_path / name) if "boundary_rate" in r]
        want = [r["boundary_rate"] for r in metrics(tmp_path / base) if "boundary_rate" in r]
        assert rates == pytest.approx(want, abs=1e-6)


def test_generate_from_a_dlcm_checkpoint(corpus, tmp_path, capsys):
    """The CLI loads the checkpoint through the one model factory and decodes with the DLCM cache; export
    to Hugging Face refuses in one line."""
    from megatron_sep.cli import main
    from megatron_sep.convert.commands import export_hf
    from megatron_sep.errors import ConversionError

    Trainer(_config(corpus, tmp_path / "run", train={"steps": 2, "eval_interval": 2})).run()
    code = main(
        [
            "generate",
            "--load",
            str(tmp_path / "run"),
            "--prompt",
            "the model reads",
            "--max-new-tokens",
            "6",
        ]
    )
    assert code == 0 and capsys.readouterr().out.strip()
    # streaming with a bounded cache is refused before any evaluation runs (and writes nothing)
    out = tmp_path / "eval"
    argv = ["eval", "--load", str(tmp_path / "run"), "--out", str(out), "--stream-tokens", "64"]
    assert main([*argv, "--cache", "sep,full"]) == 2
    assert "full cache only, not sep" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ConversionError, match="dlcm has no Hugging Face model"):
        export_hf(tmp_path / "run", tmp_path / "hf")


def test_layouts_dlcm_does_not_serve_are_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match="sequence_parallel"):
        _config(corpus, tmp_path, {"tp": 2, "sequence_parallel": True})
