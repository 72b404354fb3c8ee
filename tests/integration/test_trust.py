"""Received checkpoints are data (issue 35): no pickle runs, no path leaves its folder, no command loses a run.
Each test here failed on the code before: the payloads ran, `latest` was followed anywhere, a missing
`latest` restarted from step 0, exploded weights rotated the good checkpoints out."""

import json
import pickle
import shutil

import pytest
import torch

from megatron_sep.training import Trainer
from megatron_sep.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from megatron_sep.training.metrics import MetricsLogger
from megatron_sep.training.trainer import TrainingError

from ..conftest import tiny_config
from .test_data_safety import assert_one_line_error, cli, snapshot, write_config
from .test_training import losses


class Payload:
    """Unpickling this creates `marker`: proof that a load ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(
        tiny_config(
            corpus, run, train={"steps": 4}, checkpoint={"save_interval": 2, "keep_last": 2}
        )
    ).run()
    return run


def fresh_copy(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run, latest_checkpoint(run / "checkpoints")


def test_pickle_payloads_in_a_checkpoint_never_run(corpus, trained, tmp_path):
    run, step = fresh_copy(trained, tmp_path)
    marker = tmp_path / "ran"
    more = write_config(tiny_config(corpus, run, train={"steps": 6}), tmp_path / "more.yaml")
    # meta: the old meta.pt name with a payload instead of meta.json
    (step / "meta.json").rename(tmp_path / "meta.json")
    torch.save({"step": 4, "consumed_samples": 32, "x": Payload(marker)}, step / "meta.pt")
    for args in (
        ("export-hf", "--load", run, "--out", tmp_path / "hf"),
        ("train", "-c", more),
        ("generate", "--load", run, "--prompt", "The model", "--max-new-tokens", "2"),
    ):
        assert_one_line_error(cli(*args), "meta.pt", "holds more than numbers and strings")
    assert not marker.exists()
    (step / "meta.pt").unlink()
    (tmp_path / "meta.json").rename(step / "meta.json")
    # RNG state: a payload in the old rng_0.pt name
    (step / "rng_0.safetensors").unlink()
    torch.save({"python": Payload(marker)}, step / "rng_0.pt")
    assert_one_line_error(cli("train", "-c", more), "rng_0.pt holds no usable RNG state", "Fix:")
    assert not marker.exists()
    (step / "rng_0.pt").unlink()
    # DCP's tensor index: a plain pickle, read through an allow-list
    index = (step / ".metadata").read_bytes()
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    for args in (("export-hf", "--load", run, "--out", tmp_path / "hf2"), ("train", "-c", more)):
        assert_one_line_error(
            cli(*args),
            ".metadata cannot be read as DCP's tensor index",
            "open is not a class of DCP's metadata",
        )
    assert not marker.exists()
    # meta.json with a field of the wrong type, or missing
    good = (step / "meta.json").read_text()
    for broken, needle in (
        ({"step": "4"}, "step is '4', not a whole number"),
        ({"consumed_samples": None}, "consumed_samples is None, not a whole number"),
    ):
        (step / "meta.json").write_text(json.dumps({**json.loads(good), **broken}))
        assert_one_line_error(cli("train", "-c", more), "meta.json", needle, "Fix:")
    # truncated: the fix names the newest complete step before it, and how to point `latest` at it
    (step / "meta.json").write_text(good[: len(good) // 2])
    earlier = f"echo step_00000002 > {run / 'checkpoints' / 'latest'}"
    assert_one_line_error(cli("train", "-c", more), "meta.json", "empty or corrupt", earlier)
    (step / "meta.json").write_text(good)
    # a data file path out of the folder in an otherwise valid index
    from megatron_sep.checkpoint.files import SafeReader

    (step / ".metadata").write_bytes(index)
    md = SafeReader(str(step)).read_metadata()
    for info in md.storage_data.values():
        info.relative_path = "../../elsewhere/__0_0.distcp"
    md.storage_meta = None
    (step / ".metadata").write_bytes(pickle.dumps(md))
    assert_one_line_error(
        cli("train", "-c", more), "names the data file '../../elsewhere/__0_0.distcp', outside"
    )


def test_checkpoints_of_the_earlier_format_still_load(corpus, trained, tmp_path):
    """meta.pt and rng_<rank>.pt (written by torch.save before meta.json) load with weights_only=True, and
    the resumed run's losses equal those of a run resumed from the new format."""
    import random

    import numpy as np

    run, step = fresh_copy(trained, tmp_path)
    meta = json.loads((step / "meta.json").read_text())
    torch.save(
        {
            "consumed_samples": meta["consumed_samples"],
            "step": meta["step"],
            "layout": meta["layout"],
        },
        step / "meta.pt",
    )
    from megatron_sep.checkpoint.files import load_rng

    load_rng(step / "rng_0.safetensors")  # the same states, in the old pickle layout
    torch.save(
        {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        },
        step / "rng_0.pt",
    )
    (step / "meta.json").unlink()
    (step / "rng_0.safetensors").unlink()
    Trainer(tiny_config(corpus, run, train={"steps": 6})).run()
    ref, _ = fresh_copy(trained, tmp_path / "ref")
    Trainer(tiny_config(corpus, ref, train={"steps": 6})).run()
    assert losses(run) == losses(ref)


def test_latest_never_leads_out_of_its_folder_and_its_loss_never_restarts_a_run(
    corpus, trained, tmp_path
):
    run, step = fresh_copy(trained, tmp_path)
    root = run / "checkpoints"
    more = write_config(tiny_config(corpus, run, train={"steps": 6}), tmp_path / "more.yaml")
    other, _ = fresh_copy(trained, tmp_path / "other")
    before = {k: v for k, v in snapshot(root).items() if k != "latest"}
    (root / "latest").write_text(f"../../other/run/checkpoints/{step.name}\n")
    assert_one_line_error(
        cli("train", "-c", more),
        "not the name of a step_* folder",
        f"echo {step.name} > {root / 'latest'}",
    )
    (root / "latest").write_bytes(b"\x00\xff\xfe")
    assert_one_line_error(
        cli("train", "-c", more), str(root / "latest"), "not the name of a step_* folder"
    )
    (root / "latest").unlink()
    for broken in ("missing", "folder"):
        if broken == "folder":
            (root / "latest").mkdir()
        err = assert_one_line_error(
            cli("train", "-c", more),
            f"newest complete one is {step.name}" if broken == "missing" else "is a folder",
            f"echo {step.name} >",
        )
        assert "train.run_dir" in err
        assert {k: v for k, v in snapshot(root).items() if k != "latest"} == before
        # the log was not truncated to step 0
        assert '"step": 4' in (run / "metrics.jsonl").read_text()
    (root / "latest").rmdir()
    # a first save killed between its rename and moving `latest` in: its pointer waits beside it
    (root / ".latest.tmp").write_text(step.name + "\n")
    assert latest_checkpoint(root) == step
    proc = cli("train", "-c", more)
    assert proc.returncode == 0 and f"resumed from {step}" in proc.stdout, proc.stderr[-2000:]


def test_hf_index_shard_names_stay_in_the_folder(tmp_path):
    from ..compat.test_convert_hf import hf_random

    _, hf_dir = hf_random(tmp_path, "llama")
    secret = tmp_path / "secret.safetensors"
    shutil.copy(hf_dir / "model.safetensors", secret)
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../secret.safetensors"}}
        )
    )
    assert_one_line_error(
        cli("import-hf", "--hf", hf_dir, "--out", tmp_path / "imp"),
        "names the shard '../secret.safetensors', which is not a file name beside it",
    )
    assert not (tmp_path / "imp" / "checkpoints").exists()


def small_tokenizer(corpus, tmp_path):
    from data_tools.train_tokenizer import train_sentencepiece

    return train_sentencepiece([str(corpus["jsonl"])], tmp_path / "small", vocab_size=320)


def test_export_keeps_the_tokenizer_it_reads_and_checks_vocabularies(corpus, trained, tmp_path):
    """import-hf then export-hf --force into the same folder deleted the run's tokenizer, then failed."""
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(corpus["tokenizer"], hf / "tokenizer.model")
    cfg = tiny_config(corpus, tmp_path / "run", train={"steps": 1}, checkpoint={"save_interval": 1})
    cfg.data.tokenizer = str(hf / "tokenizer.model")
    Trainer(cfg).run()
    proc = cli("export-hf", "--load", tmp_path / "run", "--out", hf, "--force")
    assert proc.returncode == 0, proc.stderr
    assert (hf / "tokenizer.model").read_bytes() == corpus["tokenizer"].read_bytes()
    assert not list(hf.glob(".export-*"))
    assert (
        cli(
            "generate", "--load", tmp_path / "run", "--prompt", "The model", "--max-new-tokens", "2"
        ).returncode
        == 0
    )
    small = small_tokenizer(corpus, tmp_path)
    assert_one_line_error(
        cli("export-hf", "--load", trained, "--out", tmp_path / "hf_small", "--tokenizer", small),
        "is not the one the run trained with",
        "Fix:",
    )
    assert not (tmp_path / "hf_small" / "config.json").exists()


def test_train_refuses_a_tokenizer_smaller_than_the_corpus_ids(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", train={"steps": 1})
    cfg.data.tokenizer = str(small_tokenizer(corpus, tmp_path))
    assert_one_line_error(
        cli("train", "-c", write_config(cfg, tmp_path / "c.yaml")),
        corpus["prefix"],
        "outside the model's vocabulary of 320",
        "Fix:",
    )


def test_metrics_jsonl_stays_json_with_non_finite_values(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run")
    logger = MetricsLogger(cfg, tmp_path / "run", {})
    logger.log(3, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    logger.close()
    (line,) = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()

    def strict(name):
        raise ValueError(f"{name} is not JSON")

    assert json.loads(line, parse_constant=strict) == {
        "step": 3,
        "loss": None,
        "grad_norm": None,
        "lr": 1e-3,
    }


def explode_after(trainer, step):
    """After the optimizer step of `step` (counted from 1) the weights are finite but ~1e30 times too large:
    every later loss overflows. The update itself was finite, so the step counts as a good one."""

    def boom(opt, args, kwargs):
        if trainer.step == step - 1:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.mul_(1e30)

    trainer.engine.opt.register_step_post_hook(boom)


def test_exploded_weights_never_rotate_out_the_last_good_checkpoint(corpus, tmp_path):
    cfg = tiny_config(
        corpus,
        tmp_path / "run",
        train={"steps": 20, "eval_interval": 100},
        optim={"skip_nonfinite": 4},
        checkpoint={"save_interval": 1, "keep_last": 1},
    )
    trainer = Trainer(cfg)
    explode_after(trainer, 3)
    with pytest.raises(TrainingError) as e:
        trainer.run()
    root = tmp_path / "run" / "checkpoints"
    # step 3 was saved before anything showed (its update was finite); steps 4-8 skipped and saved nothing
    assert list_checkpoints(root) == ["step_00000002", "step_00000003"]
    assert f"The last good checkpoint is {root / 'step_00000002'}" in str(e.value)
    assert f"echo step_00000002 > {root / 'latest'}" in str(e.value)
    from megatron_sep.checkpoint import load_model

    model, _ = load_model(root / "step_00000002")
    assert max(p.abs().max().item() for p in model.parameters()) < 100


def test_a_save_waits_for_a_step_that_updates(corpus, tmp_path):
    """Step 2's loss is NaN (skipped) where a save is due: the save is made at step 3, not of step 2."""
    cfg = tiny_config(
        corpus,
        tmp_path / "run",
        train={"steps": 4, "eval_interval": 100},
        optim={"skip_nonfinite": 1},
        checkpoint={"save_interval": 2, "keep_last": 5},
    )
    trainer = Trainer(cfg)
    calls = {"n": 0}
    micros = trainer.global_batch // cfg.train.micro_batch_size

    def hook(module, args, out):
        calls["n"] += 1
        if micros < calls["n"] <= 2 * micros:
            return out * float("nan")

    trainer.model.final_norm.register_forward_hook(hook)
    assert trainer.run()["step"] == 4 and trainer.skipped == 1
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == ["step_00000003", "step_00000004"]


def test_load_refuses_a_checkpoint_read_by_a_racing_reader_with_the_right_advice(
    corpus, trained, tmp_path
):
    """A checkpoint rotated out while it is read (a live run with keep_last: 1) is named as such."""
    run, step = fresh_copy(trained, tmp_path)
    trainer = Trainer(tiny_config(corpus, tmp_path / "other"))
    shutil.rmtree(step)
    with pytest.raises(CheckpointError, match="was deleted while it was read"):
        load_checkpoint(step, trainer.engine)
