"""Training under parallel layouts (gloo, spawned processes) matches a single process, fp32.

Tolerance 1e-5 absolute on the loss and on the global gradient norm: the layouts only reorder
float32 sums (all-reduces, split matmuls, all-to-alls), which moves a loss of ~6 by a few 1e-7 per
step over these 6 steps.
"""

import json
from pathlib import Path

import pytest

from megatron_sep.training import Trainer

from ..conftest import tiny_config
from ..dist_utils import run_distributed

LAYOUTS = {
    "tp2": ({"tp": 2}, 2),
    "tp2_sp": ({"tp": 2, "sequence_parallel": True}, 2),
    "dp2": ({}, 2),
    "dp2_zero1": ({"zero": 1}, 2),
    "dp2_tp2": ({"tp": 2}, 4),
    "pp2_1f1b": ({"pp": 2}, 2),
    "pp2_gpipe": ({"pp": 2, "schedule": "gpipe"}, 2),
    "pp2_interleaved": ({"pp": 2, "schedule": "interleaved", "virtual_stages": 2}, 2),
    "tp2_pp2": ({"tp": 2, "pp": 2, "sequence_parallel": True}, 4),
    # context parallelism; the tiny model has 2 kv heads: cp2 splits them, cp2 x tp2 replicates the one per tp rank
    "cp2": ({"cp": 2}, 2),
    "cp2_tp2_sp": ({"cp": 2, "tp": 2, "sequence_parallel": True}, 4),
    "cp2_pp2": ({"cp": 2, "pp": 2}, 4),
    "cp2_dp2_zero1": ({"cp": 2, "zero": 1}, 4),
    # the FSDP2 engine (fully_shard over dp, or dp x cp flattened) around our tp and cp
    "dp2_fsdp2": ({"engine": "fsdp2"}, 2),
    "dp2_tp2_fsdp2": ({"engine": "fsdp2", "tp": 2}, 4),
    "cp2_dp2_fsdp2": ({"engine": "fsdp2", "cp": 2}, 4),
}
# Layouts that touch heads or the sequence run both attention kinds; schedules, data parallelism and
# tp without sp, which handle attention as pp2_1f1b and tp2_sp do, run SepLLM only (suite time).
BOTH_KINDS = ("tp2_sp", "pp2_1f1b", "cp2", "cp2_tp2_sp", "cp2_pp2", "cp2_dp2_zero1")
CASES = [
    (layout, kind)
    for layout in LAYOUTS
    for kind in ("dense", "sepllm")
    if kind == "sepllm" or layout in BOTH_KINDS
]


def config(corpus, run_dir, kind, parallel=None, steps=6, tied=False, async_save=False):
    attention = (
        {"kind": kind, "window": 6, "init_tokens": 2} if kind == "sepllm" else {"kind": "dense"}
    )
    return tiny_config(
        corpus,
        run_dir,
        attention=attention,
        parallel=parallel or {},
        model={"num_layers": 4, "tie_embeddings": tied},
        train={"steps": steps, "micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 3},
        checkpoint={"save_interval": 3, "async_save": async_save},
    )


def losses(run_dir, key="loss"):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: r[key] for r in rows if "loss" in r}, [
        r["val_loss"] for r in rows if "val_loss" in r
    ]


def _train(rank, world, corpus, run_dir, kind, parallel, until, tied=False):
    Trainer(config(corpus, run_dir, kind, parallel, tied=tied)).run(until=until)
    return True


def _train_many(rank, world, corpus, root, runs):
    """Several runs in turn on one process group (the Trainer leaves a group it did not start): a spawn's
    start-up and imports cost more than a tiny run."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name, kind, parallel, until, tied, *async_save in runs:
        Trainer(
            config(
                corpus, Path(root) / name, kind, parallel, tied=tied, async_save=bool(async_save)
            )
        ).run(until=until)
    dist.destroy_process_group()
    return True


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    out = {}
    for kind in ("dense", "sepllm"):
        d = tmp_path_factory.mktemp(f"single_{kind}")
        Trainer(config(corpus, d, kind)).run()
        out[kind] = losses(d)
        out[kind + "_grad_norm"] = losses(d, "grad_norm")[0]
    return out


# tp shards (tp2_pp2, cp2_tp2_sp) and ZeRO shards over dp x cp (cp2_dp2_zero1) gathered for one process or
# another layout; ZeRO over dp alone into a pipeline (dp2_zero1 -> pp2); and the reverse ways
RESUMES = [
    ("tp2_pp2", None),
    ("tp2_pp2", ({}, 4)),
    ("dp2_zero1", LAYOUTS["pp2_1f1b"]),
    ("cp2_dp2_zero1", None),
    ("cp2_tp2_sp", LAYOUTS["tp2"]),
    ("tp2", LAYOUTS["cp2"]),
    # across engines: FSDP2 shards gathered for one native process; native ZeRO-1 into FSDP2 under tp
    ("dp2_tp2_fsdp2", None),
    ("dp2_zero1", LAYOUTS["dp2_tp2_fsdp2"]),
]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Every layout case (6 steps), the first half of each resume case (saved at step 3) and the tied-embedding
    pipelines, grouped by world size into one spawn each; then the resumes, grouped the same way.
    -> {run name: run dir}."""
    root = tmp_path_factory.mktemp("layouts")
    first = {2: [], 4: []}
    for layout, kind in CASES:
        parallel, world = LAYOUTS[layout]
        first[world].append((f"{layout}_{kind}", kind, parallel, None, False))
    for i, (saved, _) in enumerate(RESUMES):
        parallel, world = LAYOUTS[saved]
        first[world].append((f"resume{i}", "sepllm", parallel, 3, False))
    for zero in (0, 1):  # (dp2, pp2): first and last stage hold one tied weight
        first[4].append((f"tied_zero{zero}", "sepllm", {"pp": 2, "zero": zero}, None, True))
    first[4].append(("export_tp2_pp2", "dense", {"tp": 2, "pp": 2}, 3, True))
    # an async save (the step-3 one) of ZeRO shards over dp x cp, resumed in one process below
    first[4].append(("async_resume", "sepllm", LAYOUTS["cp2_dp2_zero1"][0], 3, False, True))
    then = {2: [], 4: []}
    for i, (_, resumed) in enumerate(RESUMES):
        if resumed is None:  # in this process
            continue
        then[resumed[1]].append((f"resume{i}", "sepllm", resumed[0], None, False))
    for group in (first, then):
        for world, todo in group.items():
            if todo:
                run_distributed(_train_many, world, corpus, str(root), todo, timeout=900)
        if group is first:
            for i, (_, resumed) in enumerate(RESUMES):
                if resumed is None:
                    Trainer(config(corpus, root / f"resume{i}", "sepllm")).run()
            Trainer(config(corpus, root / "async_resume", "sepllm")).run()
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize("layout,kind", CASES)
def test_layout_matches_single_process(runs, single, kind, layout):
    got, got_val = losses(runs[f"{layout}_{kind}"])
    ref, ref_val = single[kind]
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        assert abs(got[step] - ref[step]) < 1e-5, (layout, step, got[step], ref[step])
    assert (
        all(abs(a - b) < 1e-5 for a, b in zip(got_val, ref_val))
        and len(got_val) == len(ref_val) == 2
    )
    norms, ref_norms = losses(runs[f"{layout}_{kind}"], "grad_norm")[0], single[kind + "_grad_norm"]
    assert all(abs(norms[s] - ref_norms[s]) < 1e-5 for s in ref_norms), (layout, norms, ref_norms)


@pytest.mark.parametrize(
    "case",
    [*range(len(RESUMES)), "async"],
    ids=[f"{a}->{b[1] if b else 1}" for a, b in RESUMES] + ["async_cp2_dp2_zero1->1"],
)
def test_checkpoint_resumes_under_another_layout(runs, single, case):
    got, _ = losses(runs["async_resume" if case == "async" else f"resume{case}"])
    ref, _ = single["sepllm"]
    for step in range(1, 7):
        assert abs(got[step] - ref[step]) < 1e-5, (case, step, got[step], ref[step])


@pytest.mark.parametrize("zero", [0, 1])
def test_pipeline_with_tied_embeddings(corpus, runs, tmp_path_factory, zero):
    """First and last stage hold one tied weight: their grads are summed, updates stay equal."""
    ref_dir = tmp_path_factory.mktemp("tied_single")
    Trainer(config(corpus, ref_dir, "sepllm", tied=True)).run()
    got, ref = losses(runs[f"tied_zero{zero}"])[0], losses(ref_dir)[0]
    assert all(abs(got[s] - ref[s]) < 1e-5 for s in ref)


def test_bad_layouts_rejected(corpus, tmp_path):
    from megatron_sep.config import ConfigError
    from megatron_sep.parallel import resolve_layout

    cfg = config(corpus, tmp_path, "dense")
    for parallel, world, key in (
        ({"tp": 3}, 3, "num_heads"),
        ({"tp": 4}, 4, "kv heads"),
        ({"tp": 2}, 3, "world size"),
        ({}, 3, "micro_batch_size x dp"),
        ({"pp": 4, "schedule": "interleaved", "virtual_stages": 2}, 4, "num_layers"),
        ({"pp": 2, "schedule": "interleaved"}, 2, "multiple of pp"),
    ):
        for k, v in parallel.items():
            setattr(cfg.parallel, k, v)
        if key == "multiple of pp":
            cfg.train.global_batch_size = 6  # 3 micro-batches of 2
        with pytest.raises(ConfigError, match=key):
            resolve_layout(cfg, world)
        cfg = config(corpus, tmp_path, "dense")


def test_slurm_entry_two_nodes_by_two_tasks(corpus, tmp_path, single):
    """srun-style start: 2 nodes x 2 tasks, rendezvous derived from SLURM_* alone, (dp2, tp2)."""
    run_distributed(_train, 4, corpus, str(tmp_path), "sepllm", {"tp": 2}, None, slurm_nodes=2)
    got, _ = losses(tmp_path)
    ref, _ = single["sepllm"]
    assert all(abs(got[s] - ref[s]) < 1e-5 for s in ref)


def test_slurm_first_host():
    from megatron_sep.parallel.context import first_host

    assert first_host("gpu[003-010,012],cpu1") == "gpu003"
    assert first_host("node7,node8") == "node7" and first_host("x-y[10-20]") == "x-y10"


def _train_until_signalled(rank, world, corpus, run_dir):
    import os
    import signal
    import threading

    trainer = Trainer(config(corpus, run_dir, "dense", {"zero": 1}, steps=100000))
    # only one rank is told, as when slurm's signal reaches the tasks at different times
    if rank == 1:
        threading.Timer(4.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    return trainer.run()["step"]


def test_preemption_signal_on_one_rank_stops_all_at_the_same_step(corpus, tmp_path):
    from megatron_sep.checkpoint import latest_checkpoint

    steps = run_distributed(_train_until_signalled, 2, corpus, str(tmp_path))
    assert steps[0] == steps[1] > 0
    assert latest_checkpoint(tmp_path / "checkpoints").name == f"step_{steps[0]:08d}"
    assert (tmp_path / "preempted").read_text().strip() == str(steps[0])


def test_export_from_a_sharded_checkpoint(runs, tmp_path):
    """export-hf reads a (tp2, pp2) checkpoint; transformers gives the logits of the single-process load."""
    import torch
    import transformers

    from megatron_sep.convert import export_hf
    from megatron_sep.checkpoint import load_model

    run = runs["export_tp2_pp2"]  # (tp2, pp2), tied embeddings, saved at step 3
    ours, _ = load_model(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf")).eval()
    tokens = torch.randint(0, 384, (2, 20))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-4
