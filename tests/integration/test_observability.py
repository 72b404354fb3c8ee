"""A resumed run continues its wandb run and its TensorBoard curves instead of starting new ones, and its
step lines carry the time of day, the elapsed time and an ETA."""

import re
import time

import pytest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from megatron_sep.config import ConfigError
from megatron_sep.training import Trainer
from megatron_sep.training.metrics import wandb_id

from ..conftest import tiny_config


def test_wandb_resume_appends_to_one_run(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    run = tmp_path / "run"
    cfg = tiny_config(corpus, run, train={"steps": 2}, logging={"wandb": True})
    Trainer(cfg).run(until=1)  # stopped after step 1, as a preemption would
    run_id = (run / "wandb_id").read_text().strip()
    Trainer(cfg).run()  # the requeued job
    import wandb

    wandb.teardown()  # waits for wandb-core to write the logs out
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and run_id
    # both starts wrote the same run: `wandb sync` appends the second to the first
    # (two starts within one second: wandb names the second folder ...-ID-1)
    assert all(re.search(rf"-{run_id}(-\d+)?$", r.name) for r in runs), (run_id, runs)
    # wandb-core writes the .wandb files from its own process: wait for them (at most 30 s)
    deadline = time.monotonic() + 30
    while not all((r / f"run-{run_id}.wandb").is_file() for r in runs):
        assert time.monotonic() < deadline, [sorted(p.name for p in r.iterdir()) for r in runs]
        time.sleep(0.2)
    assert (run / "wandb_id").read_text().strip() == run_id
    # read back as data: a bad id is one line with the fix
    (run / "wandb_id").write_text("../../x y\n")
    with pytest.raises(ConfigError, match=r"wandb_id holds no wandb run id.*Fix: delete the file"):
        wandb_id(run)


def scalars(log_dir, tag="loss"):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_resume_purges_rerun_steps_and_step_lines_have_a_clock(
    corpus, tmp_path, capsys
):
    run = tmp_path / "run"
    cfg = tiny_config(
        corpus,
        run,
        train={"steps": 4},
        checkpoint={"save_interval": 2},
        logging={"tensorboard": True},
    )
    Trainer(cfg).run()
    lines = [x for x in capsys.readouterr().out.splitlines() if re.match(r"step +\d+/4 \| loss", x)]
    assert len(lines) == 4
    clock = r" \| \d\d-\d\d \d\d:\d\d:\d\d \| elapsed \d+s"
    assert all(re.search(clock + r" \| eta \d+s$", x) for x in lines[:-1])
    assert re.search(clock + "$", lines[-1])  # nothing left to estimate at the last step
    # a kill after steps 3 and 4 were logged but before step 4 was saved: the restart resumes at 2
    ckpts = run / "checkpoints"
    (ckpts / "latest").write_text("step_00000002\n")
    for f in (ckpts / "step_00000004").iterdir():
        f.unlink() if f.is_file() else None
    (ckpts / "step_00000004").rename(tmp_path / "gone")
    Trainer(cfg).run()
    files = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    # the new writer opened with purge_step=3: its first event tells readers to drop steps >= 3
    starts = [e.step for e in EventFileLoader(str(files[1])).Load() if e.HasField("session_log")]
    assert starts == [3]
    assert scalars(run / "tensorboard") == [1, 2, 3, 4]
