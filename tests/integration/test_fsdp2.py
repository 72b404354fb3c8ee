"""The FSDP2 engine beside the layouts of test_parallel_training.py: one process equals native bit for bit,
tied embeddings shard as one weight, memory per rank shrinks with dp, and bad settings are refused."""

import json
from pathlib import Path

import pytest

from megatron_sep.config import ConfigError
from megatron_sep.training import Trainer

from ..conftest import tiny_config
from ..dist_utils import run_distributed


def _config(corpus, run_dir, parallel=None, tied=False, steps=4, recompute="none"):
    return tiny_config(
        corpus,
        run_dir,
        model={"num_layers": 4, "tie_embeddings": tied},
        parallel=parallel or {},
        train={
            "steps": steps,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "eval_interval": 2,
            "activation_checkpointing": recompute,
        },
        checkpoint={"save_interval": 2},
    )


def losses(run_dir):
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def local_bytes(engine) -> dict:
    """Bytes this rank holds: weights (each shard once) and Adam state after a step."""
    params = {id(p): p for p in engine.model.parameters()}.values()

    def size(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    states = [v for p in params for k, v in engine.opt.state[p].items() if k != "step"]
    return {"weights": sum(size(p) for p in params), "adam": sum(size(v) for v in states)}


def _sizes(rank, world, corpus, root, tied, recompute="none"):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = _config(corpus, Path(root) / f"dp{world}", {"engine": "fsdp2"}, tied, recompute=recompute)
    t = Trainer(cfg)
    t.run()
    out = local_bytes(t.engine)
    dist.destroy_process_group()
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_one_process_equals_native_and_dp2_halves_the_bytes(corpus, tmp_path, tied):
    """One process: FSDP2 gives the native engine's losses bit for bit (same AdamW math, no reduction).
    dp2 (gloo): the same losses within 1e-5, and each rank holds about half of the weights and Adam state
    (fully_shard cuts every tensor along dim 0; rows that do not divide by 2 leave a few bytes over); a tied
    embedding is sharded once."""
    native = Trainer(_config(corpus, tmp_path / "native", tied=tied))
    native.run()
    one = Trainer(_config(corpus, tmp_path / "fsdp2", {"engine": "fsdp2"}, tied=tied))
    one.run()
    assert losses(tmp_path / "fsdp2") == losses(tmp_path / "native")
    full = local_bytes(one.engine)
    ranks = run_distributed(_sizes, 2, corpus, str(tmp_path), tied)
    got, want = losses(tmp_path / "dp2"), losses(tmp_path / "native")
    assert all(abs(got[s] - want[s]) < 1e-5 for s in want), (got, want)
    for part in ("weights", "adam"):
        per_rank = [r[part] for r in ranks]
        assert sum(per_rank) == full[part], (part, per_rank, full)
        assert max(per_rank) <= 0.55 * full[part], (part, per_rank, full)


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_activation_checkpointing_inside_fsdp2_units(corpus, tmp_path, recompute):
    """Blocks set to recompute before fully_shard wraps them: dp2 gives one native process's losses."""
    Trainer(_config(corpus, tmp_path / "native", recompute=recompute)).run()
    run_distributed(_sizes, 2, corpus, str(tmp_path), False, recompute)
    got, want = losses(tmp_path / "dp2"), losses(tmp_path / "native")
    assert all(abs(got[s] - want[s]) < 1e-5 for s in want), (got, want)


@pytest.mark.parametrize(
    "parallel,words",
    [
        ({"engine": "fsdp2", "zero": 1}, "shards weights, gradients and Adam state itself"),
        ({"engine": "fsdp2", "offload": "optimizer"}, "together"),
        ({"engine": "fsdp2", "pp": 2}, "pipeline"),
        ({"engine": "fsdp2", "tp": 2, "sequence_parallel": True}, "sequence_parallel"),
    ],
)
def test_fsdp2_refuses_what_it_does_not_serve(corpus, tmp_path, parallel, words):
    with pytest.raises(ConfigError, match=words):
        _config(corpus, tmp_path, parallel)


def test_compiled_blocks_inside_fsdp2_units(corpus, tmp_path):
    """train.compile compiles each FSDP2-wrapped block after the engine wrapped it (its all-gathers stay
    outside the compiled code): one process trains like eager native, fp32 within 1e-4 (inductor may
    reorder float32 sums)."""
    Trainer(_config(corpus, tmp_path / "eager", steps=3)).run()
    cfg = _config(corpus, tmp_path / "compiled", {"engine": "fsdp2"}, steps=3)
    cfg.train.compile = True
    Trainer(cfg).run()
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(a) == 3 and all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)


def test_cpu_offload_needs_cuda(corpus, tmp_path):
    """FSDP2's CPU offload on a CPU run: one ConfigError when the engine is built, not torch's traceback."""
    cfg = _config(corpus, tmp_path, {"engine": "fsdp2", "offload": "optimizer+params"})
    with pytest.raises(ConfigError, match="needs CUDA"):
        Trainer(cfg)
