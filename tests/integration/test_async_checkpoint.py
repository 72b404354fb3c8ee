"""checkpoint.async_save: the state is copied to host memory and written in a background thread; `latest`
moves only once the write is complete. The checkpoints equal synchronous ones, and a kill while a write is
in flight leaves the previous checkpoint to resume from, with the uninterrupted losses."""

import json

import pytest
import torch

from megatron_sep.checkpoint import load_model
from megatron_sep.training import Trainer
from megatron_sep.config import ConfigError
from megatron_sep.checkpoint import CRASH_ENV, latest_checkpoint, list_checkpoints

from ..conftest import tiny_config
from .test_data_safety import cli, write_config
from .test_training import losses


def config(corpus, run, async_save, steps=8):
    return tiny_config(
        corpus,
        run,
        train={"steps": steps},
        checkpoint={"save_interval": 2, "keep_last": 4, "async_save": async_save},
    )


def test_async_saves_equal_synchronous_saves(corpus, tmp_path):
    Trainer(config(corpus, tmp_path / "sync", False)).run()
    Trainer(config(corpus, tmp_path / "async", True)).run()
    assert losses(tmp_path / "sync") == losses(tmp_path / "async")
    names = list_checkpoints(tmp_path / "async" / "checkpoints")
    assert (
        names
        == list_checkpoints(tmp_path / "sync" / "checkpoints")
        == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    )
    for name in names:
        a, _ = load_model(tmp_path / "async" / "checkpoints" / name)
        b, _ = load_model(tmp_path / "sync" / "checkpoints" / name)
        assert all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
        ), name
        meta = [
            json.loads((tmp_path / r / "checkpoints" / name / "meta.json").read_text())
            for r in ("sync", "async")
        ]
        assert (
            meta[0]["consumed_samples"] == meta[1]["consumed_samples"]
            and meta[0]["step"] == meta[1]["step"]
        )
    assert not list((tmp_path / "async" / "checkpoints").glob(".tmp-*"))


def test_a_kill_during_a_background_write_resumes_from_the_previous_checkpoint(corpus, tmp_path):
    cfg = write_config(config(corpus, tmp_path / "run", True), tmp_path / "cfg.yaml")
    proc = cli("train", "-c", cfg, env={CRASH_ENV: "6:async"})
    assert proc.returncode == 86, proc.stderr[-2000:]
    root = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(root).name == "step_00000004"  # step 6's write was in flight
    proc = cli("train", "-c", cfg)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-2000:]
    Trainer(config(corpus, tmp_path / "ref", False)).run()
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    assert not list(root.glob(".tmp-*"))


def test_extra_save_steps_are_saved_and_never_rotated_out(corpus, tmp_path):
    """checkpoint.extra_save_steps (Pythia's extra_save_iters): step 0 is the initial weights; the listed
    steps outlive keep_last, the others rotate out as before."""
    extra = {"save_interval": 3, "keep_last": 1, "extra_save_steps": [0, 1, 2]}
    cfg = tiny_config(corpus, tmp_path / "run", train={"steps": 8}, checkpoint=extra)
    Trainer(cfg).run()
    names = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert names == [f"step_{s:08d}" for s in (0, 1, 2, 8)]  # 3 and 6 rotated out
    meta = json.loads((tmp_path / "run" / "checkpoints" / names[0] / "meta.json").read_text())
    assert (meta["step"], meta["consumed_samples"]) == (0, 0)
    with pytest.raises(ConfigError, match="checkpoint.extra_save_steps") as e:
        tiny_config(corpus, tmp_path / "bad", checkpoint={"extra_save_steps": [-1]})
    assert "\n" not in str(e.value)
