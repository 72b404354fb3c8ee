"""Context parallelism (Ulysses): the wrapped attention core against the core on the whole sequence, and
the model's gradients under cp=2 against one process; plus the layout rules at config load.

One spawned pair of processes (gloo) runs every case. The reference backend runs in float64, where the
all-to-alls only move values (differences are summation order, < 1e-10); the Triton kernel (interpreted on
CPU) in float32, within 1e-5 as in its own tests. Model gradients: float32 within 1e-5, as the layout tests.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_sep.config import ConfigError, config_from_dict

from ..conftest import tiny_config
from ..dist_utils import run_distributed

KINDS = {
    "dense": {"kind": "dense"},
    "sepllm": {"kind": "sepllm", "separators": [3, 5], "window": 5, "init_tokens": 2},
    "streamingllm": {"kind": "streamingllm", "window": 4, "init_tokens": 2},
    "fixed_interval": {
        "kind": "fixed_interval",
        "fixed_interval": 4,
        "window": 3,
        "init_tokens": 1,
    },
}


def _core_config(attention, backend):
    extra = {} if attention["kind"] == "dense" else {"backend": backend}
    return config_from_dict(
        {
            "model": {
                "family": "llama",
                "num_layers": 1,
                "hidden_size": 64,
                "num_heads": 4,
                "vocab_size": 16,
                "max_position_embeddings": 64,
            },
            "attention": {**attention, **extra},
            "data": {"mock": True, "seq_len": 32},
            "train": {"device": "cpu"},
        }
    )


def _cores(rank, world):
    from megatron_sep.model.attention import build_core_attention, prepare_batch
    from megatron_sep.parallel.context import ParallelContext
    from megatron_sep.parallel.ulysses import UlyssesCore

    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = ParallelContext(world=world, rank=rank, cp=world, cp_rank=rank, cp_group=dist.group.WORLD)
    out = {}
    for name, attention in KINDS.items():
        for backend, dtype, tol in (
            ("reference", torch.float64, 1e-10),
            ("triton", torch.float32, 1e-5),
        ):
            if name == "dense" and backend == "triton":
                continue
            for kv_heads in (2, 1):  # 2: split over the cp ranks; 1: replicated to both
                cfg = _core_config(attention, backend)
                core = build_core_attention(cfg, 0)
                torch.manual_seed(len(out))  # every rank draws the same full tensors
                b, s, h, d = 2, 32, 4, 16
                tokens = torch.randint(0, 8, (b, s))
                batch = prepare_batch(cfg, tokens, torch.tensor([3, 5]))
                q, k, v = (torch.randn(b, s, n, d, dtype=dtype) for n in (h, kv_heads, kv_heads))
                do = torch.randn(b, h, s, d, dtype=dtype)
                full = [t.clone().requires_grad_() for t in (q, k, v)]
                # [b, h, s, d] views, as the model passes
                ref = core(*(t.transpose(1, 2) for t in full), batch)
                ref.backward(do)
                mine = [t.chunk(world, 1)[rank].clone().requires_grad_() for t in (q, k, v)]
                got = UlyssesCore(core, ctx)(*(t.transpose(1, 2) for t in mine), batch)
                got.backward(do.chunk(world, 2)[rank])
                errs = [(got - ref.chunk(world, 2)[rank]).abs().max().item()]
                errs += [
                    (m.grad - f.grad.chunk(world, 1)[rank]).abs().max().item()
                    for m, f in zip(mine, full)
                ]
                out[(name, backend, kv_heads)] = (max(errs), tol)
    dist.destroy_process_group()
    return out


def _model_grads(rank, world, corpus, run_dir, kind):
    """One micro-batch through the cp=2 plan (embedding to loss, gradients averaged over the replicas)
    against the plain model's backward on the whole sequence."""
    import copy

    from megatron_sep.model.attention import prepare_batch
    from megatron_sep.model import build_model
    from megatron_sep.parallel import init_parallel
    from megatron_sep.engine import build_engine
    from megatron_sep.parallel.parallelize import parallelize

    attention = KINDS[kind] if kind == "dense" else {**KINDS[kind], "separators": [3, 5]}
    cfg = tiny_config(
        corpus, run_dir, attention=attention, parallel={"cp": world}, model={"vocab_size": 384}
    )
    ctx = init_parallel(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg)
    plain = copy.deepcopy(model)
    tokens = torch.randint(0, 384, (2, cfg.data.seq_len))
    labels = torch.randint(0, 384, (2, cfg.data.seq_len))
    batch = prepare_batch(cfg, tokens, model.sep_ids)
    plain(tokens, labels, batch=batch).backward()
    engine = build_engine(parallelize(model, cfg, ctx), cfg, ctx)
    loss = engine.forward_backward([(tokens, labels, batch)])
    engine.sync.finish()
    dist.all_reduce(loss)
    ref = dict(plain.named_parameters())
    errs = {n: (p.grad - ref[n].grad).abs().max().item() for n, p in model.named_parameters()}
    dist.destroy_process_group()
    return abs(loss.item() / world - plain(tokens, labels, batch=batch).item()), errs


def test_ulysses_core_matches_the_core_on_the_whole_sequence():
    for result in run_distributed(_cores, 2):
        assert len(result) == 14
        for case, (err, tol) in result.items():
            assert err <= tol, (case, err)


@pytest.mark.parametrize("kind", ["dense", "sepllm"])
def test_model_gradients_under_cp2_match_one_process(corpus, tmp_path, kind):
    for loss_err, errs in run_distributed(_model_grads, 2, corpus, str(tmp_path), kind):
        assert loss_err < 1e-5
        assert len(errs) == 2 * 7 + 3 and max(errs.values()) < 1e-5, errs


def test_cp_layouts_rejected_at_config_load(corpus, tmp_path):
    """heads 4, kv heads 2, seq 32 in the tiny config."""
    for parallel, seq, fix in (
        ({"cp": 4}, 30, "divides the sequence length"),
        ({"cp": 8}, 32, "divides model.num_heads"),
        ({"cp": 4, "tp": 2}, 32, "divides model.num_heads"),
        ({"cp": 4, "tp": 2, "sequence_parallel": True}, 36, "divisible by tp \\* cp"),
    ):
        with pytest.raises(ConfigError, match=fix) as e:
            tiny_config(corpus, tmp_path, parallel=parallel, data={"seq_len": seq})
        assert "parallel.cp" in str(e.value)
    # 6 heads, 3 kv heads: cp 2 neither divides nor is a multiple
    with pytest.raises(ConfigError, match="kv heads"):
        tiny_config(
            corpus,
            tmp_path,
            parallel={"cp": 2},
            model={"hidden_size": 48, "num_heads": 6, "num_kv_heads": 3},
        )
    from megatron_sep.parallel import resolve_layout

    cfg = tiny_config(corpus, tmp_path, parallel={"cp": 2, "tp": 2})
    with pytest.raises(ConfigError, match="tp \\* pp \\* cp = 4 does not divide the world size 2"):
        resolve_layout(cfg, 2)
    assert resolve_layout(cfg, 8) == (2, 1, 2, 2)
    from megatron_sep.parallel.fp8 import check_shapes

    cfg = tiny_config(
        corpus, tmp_path, parallel={"cp": 4}, data={"seq_len": 40}, train={"micro_batch_size": 2}
    )
    with pytest.raises(ConfigError, match="per cp rank"):  # 2 x 40 / 4 = 20 tokens per rank
        check_shapes(cfg)
