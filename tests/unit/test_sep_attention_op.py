"""SepAttention as a custom operator and the per-micro-batch plan, under torch.compile (CPU).

The Triton kernels run under TRITON_INTERPRET=1 here; what is checked is the operator's registration
(schema, fake implementation, autograd) and that compiled code sees one opaque node and no id()-keyed
state: new separator patterns with the same shapes never recompile.
"""

import torch
import torch._dynamo.testing

import fused_ops
from fused_ops.sep_attention_triton import launch_config, sep_attn_fwd, tile_rows

SMALL = {name: {"BM": 16, "BN": 16} for name in ("fwd", "dq", "dkdv")}


def inputs(seed, b=2, hq=4, hk=2, s=48, d=16, density=0.2):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g, requires_grad=True) for h in (hq, hk, hk))
    return q, k, v, torch.rand(b, s, generator=g) < density


def test_opcheck_forward_and_backward():
    """Schema, fake tensors, autograd registration and AOT dispatch of the forward op (with its backward)."""
    q, k, v, is_sep = inputs(0)
    rows = (16, 16)
    plan = fused_ops.sep_plan.build_plan(is_sep, 3, [5], "triton", tile_rows=rows)
    launch = launch_config(SMALL).as_ints()
    args = (
        q,
        k,
        v,
        plan.index,
        plan.gpos,
        plan.slot,
        plan.bounds[(5, 16)],
        plan.bounds[(5, 16)],
        None,
        5,
        0.25,
        launch,
    )
    torch.library.opcheck(sep_attn_fwd, args)
    seg = torch.zeros(is_sep.shape, dtype=torch.long)
    seg[:, is_sep.shape[1] // 3 :] = 1  # two documents: the op with its optional docs input
    plan = fused_ops.sep_plan.build_plan(is_sep, 3, [5], "triton", seg, tile_rows=rows)
    torch.library.opcheck(
        sep_attn_fwd, args[:6] + (plan.bounds[(5, 16)], plan.bounds[(5, 16)], plan.docs) + args[9:]
    )


def test_compiled_triton_op_is_one_node_and_never_recompiles():
    """fullgraph=True fails on any graph break; the counter sees one compile for four separator patterns
    and two sizes of the kept-key list (the plan marks that size dynamic)."""
    counter = torch._dynamo.testing.CompileCounter()

    def attend(q, k, v, is_sep, plan):
        return fused_ops.sep_attention(
            q, k, v, is_sep, init_tokens=3, window=6, backend="triton", plan=plan
        )

    compiled = torch.compile(attend, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    sizes = set()
    # kept-key list of 128, 128, 256, 128
    for seed, density in ((0, 0.1), (1, 0.2), (2, 0.6), (3, 0.1)):
        q, k, v, is_sep = inputs(seed, s=300, density=density)
        plan = fused_ops.plan_for(is_sep, 3, [6], "triton", head_dim=16)
        sizes.add(plan.index.shape[1])
        out = compiled(q, k, v, is_sep, plan)
        ref = fused_ops.sep_attention(q, k, v, is_sep, init_tokens=3, window=6, backend="reference")
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
        go = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), go)
        want = torch.autograd.grad(ref, (q, k, v), go)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    assert counter.frame_count == 1 and sizes == {128, 256}, (counter.frame_count, sizes)
    assert tile_rows() == (64, 128)  # the default tiles the plan above was built for


def test_plan_is_built_once_and_shared():
    """The model prepares one AttentionBatch (with its plan) per micro-batch and hands it to every layer."""
    from megatron_sep.config import config_from_dict
    from megatron_sep.model import build_model

    cfg = config_from_dict(
        {
            "model": {
                "family": "llama",
                "num_layers": 3,
                "hidden_size": 32,
                "num_heads": 4,
                "vocab_size": 64,
                "max_position_embeddings": 64,
            },
            "attention": {"kind": "sepllm", "separators": [3, 4], "window": [4, 6, 4]},
            "data": {"seq_len": 32},
        }
    )
    model = build_model(cfg)
    seen = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    tokens = torch.randint(0, 64, (2, 32))
    model(tokens)
    assert len(seen) == 3 and all(b is seen[0] for b in seen) and seen[0].plan is not None
    torch.testing.assert_close(
        seen[0].plan.keep, fused_ops.kept_keys(torch.isin(tokens, torch.tensor([3, 4])), 3)
    )


def tiny(backend="reference", window=4):
    from megatron_sep.config import config_from_dict
    from megatron_sep.model import build_model

    cfg = config_from_dict(
        {
            "model": {
                "family": "llama",
                "num_layers": 2,
                "hidden_size": 64,
                "num_heads": 4,
                "vocab_size": 64,
                "max_position_embeddings": 64,
            },
            "attention": {
                "kind": "sepllm",
                "separators": [3, 4],
                "window": window,
                "backend": backend,
            },
            "data": {"seq_len": 40},
        }
    )
    torch.manual_seed(0)
    return build_model(cfg)


def test_compiled_model_never_recompiles_across_separator_patterns():
    """Blocks compiled as the Trainer compiles them; four micro-batches whose separators differ (the plan
    is built outside the compiled blocks and holds no id()-keyed state): no compile after the first."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    model = tiny()
    for block in model.layers:
        block.compile(backend=counter)
    frames = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 64, (2, 40), generator=g)
        tokens[tokens % (seed + 2) == 0] = 3  # a different density of separator 3 each time
        model(tokens, torch.randint(0, 64, (2, 40), generator=g)).backward()
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1:] == [frames[0]] * 3, frames


def test_activation_checkpointing_keeps_loss_and_gradients():
    """full (block) and selective (core attention) recomputation, eager and compiled, reference and the
    Triton op: the same loss and gradients as without (fp32; recomputation repeats the same math)."""
    tokens, labels = torch.randint(0, 64, (2, 40)), torch.randint(0, 64, (2, 40))
    for backend in ("reference", "triton"):
        base = tiny(backend)
        loss = base(tokens, labels)
        grads = torch.autograd.grad(loss, list(base.parameters()))
        for mode, compiled in (
            ("full", False),
            ("selective", False),
            ("full", True),
            ("selective", True),
        ):
            torch._dynamo.reset()
            model = tiny(backend)
            for block in model.layers:
                block.set_recompute(mode)
                if compiled:
                    block.compile(backend="aot_eager")
            other = model(tokens, labels)
            assert torch.allclose(other, loss, atol=1e-6), (backend, mode, compiled)
            for a, b in zip(torch.autograd.grad(other, list(model.parameters())), grads):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_opcheck_norm_and_rope_ops():
    from fused_ops.norms_triton import norm_fwd
    from fused_ops.rope_triton import rope

    x, res = torch.randn(3, 5, 32, requires_grad=True), torch.randn(3, 5, 32, requires_grad=True)
    w, b = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    torch.library.opcheck(norm_fwd, (x, res, w, b, 1e-5, False))
    torch.library.opcheck(norm_fwd, (x, None, w, None, 1e-6, True))
    q, k = (
        torch.randn(2, 7, 4, 16, requires_grad=True),
        torch.randn(2, 7, 2, 16, requires_grad=True),
    )
    torch.library.opcheck(rope, (q, k, torch.arange(7), 8, 10000.0, 1.0))


def test_whole_block_compiles_in_one_graph_with_triton_kernels():
    """Norms, RoPE and SepAttention as Triton custom ops: each block compiles with fullgraph=True (a graph
    break would raise) and trains like eager."""
    from megatron_sep.config import config_from_dict
    from megatron_sep.model import build_model

    def model():
        cfg = config_from_dict(
            {
                "model": {
                    "family": "neox",
                    "num_layers": 2,
                    "hidden_size": 64,
                    "num_heads": 4,
                    "vocab_size": 64,
                    "max_position_embeddings": 64,
                    "kernels": "triton",
                    "rotary_pct": 0.5,
                },
                "attention": {
                    "kind": "sepllm",
                    "separators": [3, 4],
                    "window": 4,
                    "backend": "triton",
                },
                "data": {"seq_len": 40},
            }
        )
        torch.manual_seed(0)
        return build_model(cfg)

    tokens, labels = torch.randint(0, 64, (2, 40)), torch.randint(0, 64, (2, 40))
    eager = model()
    loss = eager(tokens, labels)
    grads = torch.autograd.grad(loss, list(eager.parameters()))
    torch._dynamo.reset()
    compiled = model()
    for block in compiled.layers:
        block.compile(backend="aot_eager", fullgraph=True)
    other = compiled(tokens, labels)
    assert torch.allclose(other, loss, atol=1e-6)
    for a, b in zip(torch.autograd.grad(other, list(compiled.parameters())), grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
