"""Crash, signal and bad-input behaviour: checkpoints survive, and every failure is one line."""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_sep.config import dump_config
from megatron_sep.training import Trainer
from megatron_sep.checkpoint import CRASH_ENV, CheckpointError, latest_checkpoint, list_checkpoints
from megatron_sep.training.trainer import TrainingError

from ..conftest import tiny_config
from .test_training import launch, losses

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, cwd=None, env=None, preexec_fn=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "megatron_sep", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        preexec_fn=preexec_fn,
        timeout=timeout,
    )


def assert_one_line_error(proc, *needles):
    """Exit status 2, no traceback, and one `error:` line naming the problem and a fix."""
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    # progress bars may come before it
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    err = errors[0]
    for n in needles:
        assert n in err, (n, err)
    return err


def write_config(cfg, path):
    path.write_text(dump_config(cfg))
    return path


def snapshot(root: Path) -> dict:
    """(inode, mtime_ns, size) of every file under a checkpoints folder: any rewrite changes it."""
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---- 1. re-saving a step ------------------------------------------------------------------------


def test_finished_run_exits_zero_without_touching_checkpoints(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", train={"steps": 4}, checkpoint={"save_interval": 2})
    Trainer(cfg).run()
    root = tmp_path / "run" / "checkpoints"
    before = snapshot(root)
    proc = cli("train", "-c", write_config(cfg, tmp_path / "cfg.yaml"))
    assert proc.returncode == 0 and "the run is finished: it is at step 4" in proc.stdout, (
        proc.stderr
    )
    assert snapshot(root) == before


def test_stop_right_after_resume_saves_nothing(corpus, tmp_path):
    """A preemption before the first new step after a resume used to re-save (delete, then rename) the
    step that `latest` names. The state on disk is that step: nothing is written."""
    Trainer(tiny_config(corpus, tmp_path / "run")).run(until=4)
    root = tmp_path / "run" / "checkpoints"
    before = snapshot(root)
    out = Trainer(tiny_config(corpus, tmp_path / "run")).run(until=4)
    assert out["step"] == 4 and snapshot(root) == before


def test_resave_killed_between_renames_still_resumes(corpus, tmp_path):
    """A re-save of the step `latest` names: without a kill it replaces the folder and leaves nothing
    aside; killed after the old folder moved aside and before the new one is renamed in, the run resumes
    from the moved-aside folder, with the uninterrupted losses."""
    cfg = tiny_config(corpus, tmp_path / "run")
    Trainer(cfg).run(until=4)
    script = (
        "import sys; from megatron_sep.config import load_config; from megatron_sep.training import Trainer\n"
        "t = Trainer(load_config(sys.argv[1])); t.resume(); t.save()\n"
    )
    root = tmp_path / "run" / "checkpoints"
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    config_path = str(write_config(cfg, tmp_path / "cfg.yaml"))
    before = snapshot(root)
    proc = subprocess.run(
        [sys.executable, "-c", script, config_path],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = snapshot(root)
    # rewritten in place, nothing left aside
    assert after.keys() == before.keys() and after != before
    proc = subprocess.run(
        [sys.executable, "-c", script, config_path],
        env={**env, CRASH_ENV: "4:swap"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 86, proc.stderr
    assert (
        not (root / "step_00000004").exists()
        and (root / ".old-step_00000004" / "meta.json").is_file()
    )
    assert latest_checkpoint(root).name == ".old-step_00000004"
    Trainer(tiny_config(corpus, tmp_path / "run")).run()
    Trainer(tiny_config(corpus, tmp_path / "ref")).run()
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    assert (root / "step_00000004" / "meta.json").is_file() and not list(root.glob(".old-*"))


@pytest.mark.parametrize("async_save,kills", [(False, 12), (True, 8)], ids=["sync", "async"])
def test_random_kills_always_resume_with_the_uninterrupted_losses(
    corpus, tmp_path, async_save, kills
):
    """12 SIGKILLs at random moments: during start-up and resume, or a random 0-0.3 s after a new step was
    logged (inside steps and saves: a save every 5 steps takes about a third of the time). Every restart
    resumes, and the finished run's losses equal an uninterrupted run's, bit for bit (fp32, CPU). With async
    saves (8 kills) the kills also land while a save is written in the background or published."""
    steps = 120

    def config(run, async_save=async_save):
        return tiny_config(
            corpus,
            tmp_path / run,
            train={"steps": steps, "eval_interval": 60},
            checkpoint={"save_interval": 5, "keep_last": 2, "async_save": async_save},
        )

    Trainer(config("ref", False)).run()
    rng, root = random.Random(14), tmp_path / "run" / "checkpoints"
    metrics = tmp_path / "run" / "metrics.jsonl"
    for _ in range(kills):
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        proc = launch(config("run"), tmp_path)
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0.2, 2.5))  # start-up, checkpoint loading
        else:
            deadline = time.time() + 60
            while (
                proc.poll() is None
                and time.time() < deadline
                and (not metrics.exists() or len(metrics.read_text().splitlines()) <= logged)
            ):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        out, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, out[-3000:]  # killed, not finished or failed
        if (root / "latest").exists():
            assert latest_checkpoint(root) is not None  # never a `latest` naming a missing folder
    proc = launch(config("run"), tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    train_steps = [r["step"] for r in map(json.loads, open(metrics)) if "loss" in r]
    assert train_steps == list(range(1, steps + 1))  # no repeats after the resumes
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


# ---- 2. non-finite values ----------------------------------------------------------------------


def test_diverging_run_stops_before_saving_nan_and_keeps_good_checkpoints(corpus, tmp_path):
    cfg = tiny_config(
        corpus,
        tmp_path / "run",
        train={"steps": 40},
        optim={"lr": 1e4, "min_lr": 0.0, "clip_grad": 0.0, "warmup_steps": 0},
        checkpoint={"save_interval": 1, "keep_last": 2},
        logging={"log_interval": 10},
    )
    proc = cli("train", "-c", write_config(cfg, tmp_path / "cfg.yaml"))
    err = assert_one_line_error(proc, "not finite", "Fix:")
    root = tmp_path / "run" / "checkpoints"
    saved = list_checkpoints(root)
    assert saved, "the first steps are finite and saved"
    # the newest checkpoint whose weights trained on (the one after it gave the non-finite loss)
    good = err.split("The last good checkpoint is ")[1].split(";")[0].split(" ")[0]
    assert Path(good).parent == root and Path(good).name in saved
    from megatron_sep.checkpoint import load_model

    for name in saved:  # every checkpoint that exists holds finite weights
        model, _ = load_model(root / name)
        assert all(p.isfinite().all() for p in model.parameters()), name


@pytest.mark.parametrize("engine", ["native", "fsdp2"])
def test_skip_nonfinite_drops_one_bad_update(corpus, tmp_path, engine):
    """A forward hook makes step 3's loss NaN. With optim.skip_nonfinite=1 the update is dropped (weights
    unchanged by that step) and the run finishes; with 0 it stops at step 3. Both engines skip inside fused
    AdamW (found_inf), with no host sync before the update."""

    def poisoned(skip, run):
        trainer = Trainer(
            tiny_config(
                corpus,
                tmp_path / run,
                train={"steps": 5},
                optim={"skip_nonfinite": skip},
                parallel={"engine": engine},
            )
        )
        calls = {"n": 0}
        micros = trainer.global_batch // trainer.cfg.train.micro_batch_size

        def hook(module, args, out):
            calls["n"] += 1
            if 2 * micros < calls["n"] <= 3 * micros:  # the micro-batches of step 3
                return out * float("nan")

        trainer.model.final_norm.register_forward_hook(hook)  # feeds the (fused) head and loss
        return trainer

    with pytest.raises(TrainingError, match="not finite at step 3"):
        poisoned(0, "stop").run()
    trainer = poisoned(1, "skip")
    seen = {}

    # the weights each step starts from (embedding: the first module)
    def weights_before_step(module, args):
        seen.setdefault(trainer.step, [p.detach().clone() for p in trainer.model.parameters()])

    trainer.model.embed.register_forward_pre_hook(weights_before_step)
    out = trainer.run()
    assert out["step"] == 5 and trainer.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))  # step 3 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))


# ---- 3-5. conversions never clobber ------------------------------------------------------------


def test_import_hf_never_touches_an_existing_run(corpus, tmp_path):
    from ..compat.test_convert_hf import hf_random

    _, hf_dir = hf_random(tmp_path, "llama")
    cfg = tiny_config(corpus, tmp_path / "run", train={"steps": 2}, checkpoint={"save_interval": 2})
    Trainer(cfg).run()
    before = snapshot(tmp_path / "run")
    step = latest_checkpoint(tmp_path / "run" / "checkpoints")
    # the run, or inside it
    for out in (tmp_path / "run", tmp_path / "run" / "checkpoints", step, step / "x"):
        for extra in ([], ["--force"]):
            err = assert_one_line_error(
                cli("import-hf", "--hf", hf_dir, "--out", out, *extra),
                "already holds checkpoints, or lies inside a checkpoint folder",
            )
            assert "never done, even with --force" in err
    assert snapshot(tmp_path / "run") == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("mine")
    assert_one_line_error(
        cli("import-hf", "--hf", hf_dir, "--out", notes), "is not empty", "--force"
    )
    assert cli("import-hf", "--hf", hf_dir, "--out", notes, "--force").returncode == 0
    assert (notes / "README.txt").read_text() == "mine" and list_checkpoints(notes / "checkpoints")


def test_resume_with_another_architecture_is_refused_untouched(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", train={"steps": 2}, checkpoint={"save_interval": 2})
    Trainer(cfg).run()
    before, config = (
        snapshot(tmp_path / "run" / "checkpoints"),
        (tmp_path / "run" / "config.yaml").read_text(),
    )
    fewer = tiny_config(corpus, tmp_path / "run", train={"steps": 4}, model={"num_layers": 1})
    assert_one_line_error(
        cli("train", "-c", write_config(fewer, tmp_path / "fewer.yaml")),
        "model.layers.1.",
        "is in the checkpoint but not in the model",
        "Fix:",
    )
    wider = tiny_config(corpus, tmp_path / "run", train={"steps": 4}, model={"hidden_size": 64})
    assert_one_line_error(
        cli("train", "-c", write_config(wider, tmp_path / "wider.yaml")),
        "model.embed.weight has shape [384, 32] in the checkpoint but [384, 64]",
    )
    assert snapshot(tmp_path / "run" / "checkpoints") == before
    assert (tmp_path / "run" / "config.yaml").read_text() == config
    fresh = tiny_config(corpus, tmp_path / "run", train={"steps": 4}, checkpoint={"resume": False})
    assert_one_line_error(
        cli("train", "-c", write_config(fresh, tmp_path / "fresh.yaml")),
        "holds checkpoints of an earlier run",
    )


def test_export_from_another_directory_and_into_non_empty_dirs(corpus, tmp_path):
    (tmp_path / "proj").mkdir()
    os.symlink(corpus["tokenizer"], tmp_path / "proj" / "tok.model")
    cfg = tiny_config(corpus, "runs/r", train={"steps": 2}, checkpoint={"save_interval": 2})
    cfg.data.tokenizer = "tok.model"  # relative to where training starts
    cfg.data.paths = [os.path.relpath(corpus["prefix"], tmp_path / "proj")]
    assert (
        cli(
            "train", "-c", write_config(cfg, tmp_path / "proj" / "cfg.yaml"), cwd=tmp_path / "proj"
        ).returncode
        == 0
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = cli(
        "export-hf", "--load", tmp_path / "proj" / "runs" / "r", "--out", "hf", cwd=elsewhere
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((elsewhere / "hf" / "config.json").read_text())["eos_token_id"] is not None
    assert (elsewhere / "hf" / "tokenizer.json").is_file()
    # a non-empty --out: refused; with --force only the export's own files are replaced
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    (out / "tokenizer.json").write_text("stale")
    assert_one_line_error(
        cli("export-hf", "--load", tmp_path / "proj" / "runs" / "r", "--out", out),
        "is not empty",
        "--force",
    )
    assert (
        cli(
            "export-hf", "--load", tmp_path / "proj" / "runs" / "r", "--out", out, "--force"
        ).returncode
        == 0
    )
    assert (out / "notes.txt").read_text() == "mine" and not (
        out / "model-00001-of-00002.safetensors"
    ).exists()
    assert json.loads((out / "tokenizer.json").read_text())["model"]
    (
        tmp_path / "proj" / "tok.model"
    ).unlink()  # the tokenizer is gone: a clear error, not a silent omission
    assert_one_line_error(
        cli("export-hf", "--load", tmp_path / "proj" / "runs" / "r", "--out", tmp_path / "x"),
        "cannot be loaded",
        "--tokenizer",
    )
    assert (
        cli(
            "export-hf",
            "--load",
            tmp_path / "proj" / "runs" / "r",
            "--out",
            tmp_path / "x",
            "--tokenizer",
            corpus["tokenizer"],
        ).returncode
        == 0
    )


# ---- 6. one run per run_dir --------------------------------------------------------------------


def test_second_run_on_a_locked_run_dir_fails_at_once(corpus, tmp_path):
    cfg = tiny_config(
        corpus, tmp_path / "run", train={"steps": 100000}, checkpoint={"save_interval": 100000}
    )
    first = launch(cfg, tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 2
    ):
        time.sleep(0.2)
    second = cli("train", "-c", write_config(cfg, tmp_path / "cfg2.yaml"))
    assert_one_line_error(second, f"is in use by a training run (pid {first.pid} on ")
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    steps = [r["step"] for r in map(json.loads, open(metrics)) if "loss" in r]
    assert steps == sorted(set(steps))  # one writer


# ---- 7. operating-system errors and bad arguments ----------------------------------------------


def test_os_errors_are_one_line(corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = tiny_config(corpus, blocker, train={"steps": 2})
    assert_one_line_error(
        cli("train", "-c", write_config(cfg, tmp_path / "c1.yaml")), str(blocker), "Fix:"
    )
    assert_one_line_error(
        cli(
            "preprocess",
            "--input",
            corpus["jsonl"],
            "--tokenizer",
            corpus["tokenizer"],
            "--out",
            blocker / "text",
            "--workers",
            "1",
        ),
        "Not a directory",
        "Fix:",
    )
    assert not list(tmp_path.glob("*.tmp.*"))


def test_disk_full_during_save_keeps_the_last_checkpoint(corpus, tmp_path):
    """A file-size limit makes the step-8 save fail with EFBIG the way a full disk fails with ENOSPC."""
    cfg = tiny_config(corpus, tmp_path / "run", train={"steps": 4})
    Trainer(cfg).run()
    more = tiny_config(corpus, tmp_path / "run", train={"steps": 8})
    size = sum(
        p.stat().st_size
        for p in (tmp_path / "run" / "checkpoints" / "step_00000004").glob("*.distcp")
    )

    def limit():
        # write() then fails with EFBIG instead of killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    err = assert_one_line_error(
        cli("train", "-c", write_config(more, tmp_path / "more.yaml"), preexec_fn=limit),
        "cannot write checkpoint",
        "step_00000008",
        "earlier checkpoints are untouched",
    )
    root = tmp_path / "run" / "checkpoints"
    assert "Traceback" not in err and latest_checkpoint(root).name == "step_00000004"
    assert not list(root.glob(".tmp-*"))
    Trainer(tiny_config(corpus, tmp_path / "run", train={"steps": 8})).run()  # resumes from step 4


def test_bad_checkpoint_and_conversion_inputs_are_one_line(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", train={"steps": 2}, checkpoint={"save_interval": 2})
    Trainer(cfg).run()
    meta = latest_checkpoint(tmp_path / "run" / "checkpoints") / "meta.json"
    meta.write_bytes(b"")
    assert_one_line_error(
        cli("export-hf", "--load", tmp_path / "run", "--out", tmp_path / "hf"),
        "meta.json is empty or corrupt",
    )
    more = tiny_config(corpus, tmp_path / "run", train={"steps": 4})
    assert_one_line_error(
        cli("train", "-c", write_config(more, tmp_path / "more.yaml")), "meta.json is empty"
    )
    for conf, needle in (
        ({"model_type": "bert", "hidden_size": 8}, "model_type 'bert' is not supported"),
        ({"model_type": "gpt_neox", "hidden_size": 8}, "config.json lacks num_hidden_layers"),
    ):
        d = tmp_path / conf["model_type"]
        d.mkdir()
        (d / "config.json").write_text(json.dumps(conf))
        assert_one_line_error(
            cli("import-hf", "--hf", d, "--out", tmp_path / f"imp_{d.name}"), needle
        )


def test_generate_rejects_bad_arguments(corpus, tmp_path):
    Trainer(
        tiny_config(corpus, tmp_path / "run", train={"steps": 1}, checkpoint={"save_interval": 1})
    ).run()
    assert_one_line_error(
        cli("generate", "--load", tmp_path / "run", "--prompt", ""), "the prompt is empty"
    )
    for flag, value, needle in (
        ("--max-new-tokens", "0", "must be >= 1"),
        ("--max-new-tokens", "-5", ">= 1"),
        ("--temperature", "-1", "must be >= 0.0"),
        ("--temperature", "nan", "finite"),
        ("--top-p", "1.5", "(0, 1]"),
        ("--cache-sizes", "4,64,256", "four counts"),
    ):
        assert_one_line_error(
            cli("generate", "--load", tmp_path / "run", "--prompt", "x", flag, value),
            needle,
            "Fix: see `megatron-sep generate --help`",
        )
    # a dense checkpoint has no separator ids; a capacity below the blocks it must hold
    for extra, needle in (
        (["--cache", "sep"], "separator token ids"),
        (["--cache", "streaming", "--cache-sizes", "4,0,256,100"], "capacity=100 must exceed"),
    ):
        assert_one_line_error(
            cli("generate", "--load", tmp_path / "run", "--prompt", "x", *extra), needle
        )
    moved = tmp_path / "gone.model"  # the run's tokenizer is gone: the fix names --tokenizer
    os.symlink(corpus["tokenizer"], moved)
    cfg = tiny_config(
        corpus, tmp_path / "run2", train={"steps": 1}, checkpoint={"save_interval": 1}
    )
    cfg.data.tokenizer = str(moved)
    Trainer(cfg).run()
    moved.unlink()
    assert_one_line_error(
        cli("generate", "--load", tmp_path / "run2", "--prompt", "x"), "--tokenizer PATH"
    )


def test_ctrl_c_saves_and_a_second_ctrl_c_exits_at_once(corpus, tmp_path):
    cfg = tiny_config(
        corpus, tmp_path / "run", train={"steps": 100000}, checkpoint={"save_interval": 100000}
    )
    metrics = tmp_path / "run" / "metrics.jsonl"

    def started(proc):
        deadline = time.time() + 120
        while time.time() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 2
        ):
            time.sleep(0.1)
        return proc

    proc = started(launch(cfg, tmp_path))
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "received SIGINT" in out and "Traceback" not in out, out
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is not None
    metrics.unlink()
    proc = started(launch(cfg, tmp_path))
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130) and "Traceback" not in out, out  # 0 if the save won the race


# ---- 8. data tools -----------------------------------------------------------------------------


def test_data_tool_inputs(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert_one_line_error(
        cli(
            "preprocess",
            "--input",
            bad,
            "--tokenizer",
            corpus["tokenizer"],
            "--out",
            tmp_path / "b",
            "--workers",
            "1",
        ),
        f"{bad}:2 is not UTF-8",
    )
    number = tmp_path / "number.jsonl"
    number.write_text('{"text": "fine"}\n{"text": 5}\n')
    for cmd in (
        [
            "preprocess",
            "--input",
            number,
            "--tokenizer",
            corpus["tokenizer"],
            "--out",
            tmp_path / "n",
            "--workers",
            "1",
        ],
        ["tokenizer", "train", "--input", number, "--out", tmp_path / "nt", "--vocab-size", "300"],
    ):
        assert_one_line_error(cli(*cmd), f"{number}:2 has a int under 'text', not text")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    assert_one_line_error(
        cli(
            "preprocess",
            "--input",
            binary,
            "--tokenizer",
            corpus["tokenizer"],
            "--out",
            tmp_path / "c",
            "--workers",
            "1",
        ),
        "does not look like text",
    )
    broken = tmp_path / "late.jsonl"  # fails after some documents were written to the temporaries
    broken.write_text(Path(corpus["jsonl"]).read_text() + "not json\n")
    assert_one_line_error(
        cli(
            "preprocess",
            "--input",
            broken,
            "--tokenizer",
            corpus["tokenizer"],
            "--out",
            tmp_path / "d",
            "--workers",
            "1",
        ),
        "is not valid JSON",
    )
    assert not list(tmp_path.glob("*.tmp.*")) and not list(tmp_path.glob("d.*"))
    ok = cli(
        "tokenizer",
        "train",
        "--input",
        corpus["jsonl"],
        "--out",
        tmp_path / "big.json",
        "--type",
        "hf-bpe",
        "--vocab-size",
        "100000",
    )
    assert ok.returncode == 0 and "the corpus supports only" in ok.stdout, ok.stdout + ok.stderr
    assert_one_line_error(
        cli(
            "tokenizer",
            "train",
            "--input",
            corpus["jsonl"],
            "--out",
            tmp_path / "big.json",
            "--type",
            "hf-bpe",
            "--vocab-size",
            "300",
        ),
        "exist",
        "--force",
    )
    assert_one_line_error(
        cli(
            "preprocess",
            "--input",
            corpus["jsonl"],
            "--tokenizer",
            corpus["tokenizer"],
            "--out",
            Path(corpus["prefix"]),
            "--workers",
            "1",
        ),
        "exist",
        "--force",
    )


def test_bad_loads_raise_checkpoint_error_in_process(corpus, tmp_path):
    """The library raises the same typed errors the CLI turns into one line."""
    Trainer(
        tiny_config(corpus, tmp_path / "run", train={"steps": 2}, checkpoint={"save_interval": 2})
    ).run()
    other = Trainer(tiny_config(corpus, tmp_path / "other", model={"num_layers": 3}), log=False)
    from megatron_sep.checkpoint import load_checkpoint

    with pytest.raises(
        CheckpointError, match=r"model\.layers\.2\..* is missing from the checkpoint"
    ):
        load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"), other.engine)
