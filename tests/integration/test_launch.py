"""launch/slurm.sbatch as slurm runs it: from a fresh directory, with stub srun / scontrol (and a stub python
where the config check is not the point) first on PATH, recording their arguments."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "slurm.sbatch"

RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "{log}"
{extra}
"""
HOSTNAMES = '[ "$1 $2" = "show hostnames" ] && printf "gpu003\\ngpu004\\n"; exit 0'
# a python that only answers --check-config, as the real one prints it
FAKE_PYTHON = 'case "$*" in *--check-config*) echo "train:"; echo "  run_dir: {run_dir}";; esac'


def stubs(tmp_path: Path, run_dir: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, extra in [
        ("srun", ""),
        ("scontrol", HOSTNAMES),
        ("fake_python", FAKE_PYTHON.format(run_dir=run_dir)),
    ]:
        path = bin_dir / name
        path.write_text(RECORDER.format(log=tmp_path / f"{name}.log", extra=extra))
        path.chmod(0o755)
    return bin_dir


def sbatch(tmp_path, run_dir, *args, real_python=False, **env_extra):
    """Run the script as sbatch would on the batch host of a 2-node x 8-GPU job, in a fresh directory."""
    cwd = tmp_path / "submit"
    cwd.mkdir(exist_ok=True)
    bin_dir = stubs(tmp_path, run_dir)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[003-004]",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_CPUS_ON_NODE": "96",
        "PYTHON": sys.executable if real_python else str(bin_dir / "fake_python"),
        "PYTHONPATH": str(REPO),
        **env_extra,
    }
    for key in ("MASTER_ADDR", "MASTER_PORT", "SLURM_CPUS_PER_TASK", "DRY_RUN", "CONTAINER_IMAGE"):
        if key not in env_extra:
            env.pop(key, None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert not (cwd / "logs").exists()  # nothing needed before submission, nothing left behind

    def calls(name):
        log = tmp_path / f"{name}.log"
        return log.read_text().splitlines() if log.is_file() else []

    return proc.stdout, calls


def test_sbatch_srun_line_and_requeue_from_fresh_dir(tmp_path, corpus):
    """The real config check (data files included: the test corpus) gives run_dir; srun starts one task
    per GPU with the job's CPUs shared out; a run_dir/preempted left by the trainer requeues the job."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "preempted").write_text("17\n")
    config = REPO / "configs" / "tiny_cpu.yaml"
    data = [f"data.tokenizer={corpus['tokenizer']}", f"data.paths=[{corpus['prefix']}]"]
    sets = ["--set", f"train.run_dir={run_dir}", "--set", data[0], "--set", data[1]]
    out, calls = sbatch(tmp_path, run_dir, str(config), *sets, real_python=True)
    (srun,) = calls("srun")
    assert shlex.split(srun) == [
        "--kill-on-bad-exit=1",
        "--ntasks-per-node=8",
        "--cpus-per-task=12",  # 96 CPUs of the node / 8 tasks
        sys.executable,
        "-m",
        "megatron_sep",
        "train",
        "-c",
        str(config),
        *sets,
    ]
    assert calls("scontrol") == ["show hostnames gpu[003-004]", "requeue 4242"]
    assert f"rank 0 at gpu003:{20000 + 4242}, run_dir {run_dir}" in out
    assert "preempted at step 17; requeueing 4242" in out


def test_sbatch_no_requeue_cpus_from_allocation_and_container(tmp_path):
    run_dir = tmp_path / "run"
    out, calls = sbatch(
        tmp_path,
        run_dir,
        "cfg.yaml",
        SLURM_CPUS_PER_TASK="6",
        CONTAINER_IMAGE="/shared/msep.sqsh",
        MASTER_ADDR="head",
    )
    check, train = calls("srun")
    mounts = f"--container-mounts={tmp_path / 'submit'}:{tmp_path / 'submit'}"
    # with a container, the config check runs in it too (one task), then the training step
    assert check.startswith(f"--nodes=1 --ntasks=1 --container-image=/shared/msep.sqsh {mounts}")
    assert check.endswith("train -c cfg.yaml --check-config")
    assert "--cpus-per-task=6 --container-image=/shared/msep.sqsh" in train
    assert calls("scontrol") == []  # MASTER_ADDR given; no preempted file: no requeue
    assert "rank 0 at head:" in out and "requeue" not in out


def test_sbatch_dry_run_prints_and_runs_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "preempted").write_text("3\n")
    out, calls = sbatch(tmp_path, run_dir, "cfg.yaml", "--set", "optim.lr=1e-4", DRY_RUN="1")
    assert calls("srun") == [] and calls("scontrol") == ["show hostnames gpu[003-004]"]
    assert calls("fake_python") == [
        "-m megatron_sep train -c cfg.yaml --set optim.lr=1e-4 --check-config"
    ]
    lines = out.splitlines()
    assert "dry run: would run" in lines
    assert (
        "  export MASTER_ADDR=gpu003" in lines
        and "  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in lines
    )
    srun = next(line for line in lines if line.startswith("  srun "))
    assert shlex.split(srun)[1:4] == [
        "--kill-on-bad-exit=1",
        "--ntasks-per-node=8",
        "--cpus-per-task=12",
    ]
    assert srun.rstrip().endswith("train -c cfg.yaml --set optim.lr=1e-4")
    assert f"  then, if {run_dir}/preempted exists: scontrol requeue 4242" in lines


@pytest.mark.parametrize("bad", ["--set", ""])
def test_sbatch_bad_config_stops_before_srun(tmp_path, bad):
    """A config the check refuses stops the job with its one-line error, before any GPU task starts."""
    args = [str(REPO / "configs" / "tiny_cpu.yaml"), "--set", "parallel.tp=3"] if bad else []
    env = {
        **os.environ,
        "PATH": f"{stubs(tmp_path, tmp_path)}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "SLURM_JOB_ID": "1",
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert not (tmp_path / "srun.log").exists()
    assert ("parallel.tp" if bad else "usage: sbatch launch/slurm.sbatch CONFIG") in proc.stderr
