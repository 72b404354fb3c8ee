"""Evaluation when train.eval_iters does not share out evenly over the data-parallel ranks (issue 35).

Every dp rank runs ceil(eval_iters / dp) eval forwards: under DeepSpeed ZeRO-3 each forward all-gathers the
weights, so a rank with no validation batch of its own (eval_iters < dp) or one fewer (eval_iters % dp != 0)
would leave the others waiting in that gather. Such a rank repeats a batch and drops its loss. 2 gloo
processes, dp=2, 2 steps with an eval after each; the last val_loss must equal one process's evaluation of
the saved weights on the same eval_iters batches.

Tolerance 1e-5 absolute on a loss of ~6: the two sides run the same fp32 forwards on the same weights and
differ at most in the order and width of the sums (the trainer sums micro-batch means in float32 before the
float64 all-reduce, the reference in float64), a few 1e-7 at most (equal here). A padded batch that was
counted moves the mean far more: added to the sum, by ~6 (eval_iters=1) or ~2 (eval_iters=3); averaged in
over ceil(eval_iters / dp) * dp forwards, by ~2e-3 (eval_iters=3: the padding batch's loss is not the mean).

A hang (the bug) fails the test: run_distributed's queue times out (TIMEOUT) and kills the processes.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_sep.training import Trainer

from ..conftest import tiny_config
from ..dist_utils import run_distributed

TOL = 1e-5
TIMEOUT = 150  # the pair runs in ~15 s on 2 cores; a hang fails here instead of stalling the suite
HAS_DS = importlib.util.find_spec("deepspeed") is not None
# DeepSpeed keeps parameters under 1e5 elements whole on every rank (all of this tiny model's) and keeps
# gathered ones that are used again soon: then only the first forward gathers, and uneven eval counts slip
# through. Partition and release every parameter, as a large model's are, so each forward gathers.
PARTITION_ALL = {
    "zero_optimization": {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0}
}
# (run dir, parallel section, eval_iters): dp=2 on 2 processes
ZERO3 = {"engine": "deepspeed", "zero": 3, "deepspeed": PARTITION_ALL}
CASES = [
    ("zero3_iters1", ZERO3, 1),  # rank 1 has no batch of its own
    ("zero3_iters3", ZERO3, 3),  # rank 1 has one batch, rank 0 two
    # native: no collective over dp in a forward; rank 1 pads all the same
    ("zero1_iters1", {"zero": 1}, 1),
]
RUN = [c for c in CASES if HAS_DS or c[1].get("engine") != "deepspeed"]


def config(corpus, run_dir, parallel, eval_iters):
    return tiny_config(
        corpus,
        run_dir,
        parallel=parallel,
        attention={"kind": "dense"},
        train={
            "steps": 2,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "eval_interval": 1,
            "eval_iters": eval_iters,
        },
    )


def _runs(rank, world, corpus, root):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name, parallel, eval_iters in RUN:
        Trainer(config(corpus, Path(root) / name, parallel, eval_iters)).run()
    dist.destroy_process_group()
    return True


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_ranks")
    run_distributed(_runs, 2, corpus, str(root), timeout=TIMEOUT)
    return root


@pytest.mark.parametrize("name,parallel,eval_iters", CASES, ids=[c[0] for c in CASES])
def test_every_rank_evaluates_and_padding_is_not_counted(runs, name, parallel, eval_iters):
    if parallel.get("engine") == "deepspeed" and not HAS_DS:
        pytest.skip("DeepSpeed is not installed")
    from megatron_sep.checkpoint import load_model
    from megatron_sep.data.dataset import run_datasets
    from megatron_sep.inference.evaluate import validation_loss

    rows = [json.loads(line) for line in open(runs / name / "metrics.jsonl")]
    vals = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(vals) == [1, 2]
    model, cfg = load_model(runs / name)  # the step-2 checkpoint: the weights of the last eval
    assert cfg.train.eval_iters == eval_iters
    ref = validation_loss(
        model, run_datasets(cfg)[1], eval_iters, cfg.train.micro_batch_size, torch.device("cpu")
    )
    assert abs(vals[2] - ref) < TOL, (name, vals[2], ref)
