"""The SepAttention custom op on the GPU under torch.compile (inductor), activation checkpointing and
CUDA graph capture: the same outputs and gradients as eager (bf16 inputs; the op runs the same kernels,
so equality is exact except where inductor reorders the surrounding arithmetic: atol 1e-2 on bf16)."""

import pytest
import torch

import fused_ops

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device; the CPU suite is tests/")


def case(seed, s=2048):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (
        torch.randn(2, h, s, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        for h in (8, 4, 4)
    )
    return q, k, v, torch.rand(2, s, device="cuda", generator=g) < 0.1


def attend(q, k, v, is_sep, plan):
    out = fused_ops.sep_attention(
        q, k, v, is_sep, init_tokens=3, window=128, backend="triton", plan=plan
    )
    return (out.float() * 1.5).to(out.dtype)  # something around the op for inductor to fuse


def grads(fn, q, k, v, is_sep, plan, go):
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*x, is_sep, plan)
    out.backward(go)
    return [out.detach()] + [t.grad for t in x]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_inductor_compiled_op_matches_eager_without_recompiles(checkpointed):
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    torch._dynamo.reset()
    fn = attend
    if checkpointed:

        def fn(q, k, v, is_sep, plan):
            return torch.utils.checkpoint.checkpoint(
                attend, q, k, v, is_sep, plan, use_reentrant=False
            )

    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for seed in range(3):
        q, k, v, is_sep = case(seed)
        plan = fused_ops.plan_for(is_sep, 3, [128], "triton", head_dim=128)
        go = torch.randn_like(q)
        for a, b in zip(
            grads(compiled, q, k, v, is_sep, plan, go), grads(attend, q, k, v, is_sep, plan, go)
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-2)
    assert counter.frame_count == 1


def test_cuda_graph_capture_and_replay():
    q, k, v, is_sep = case(0)
    plan = fused_ops.plan_for(is_sep, 3, [128], "triton", head_dim=128)
    go = torch.randn_like(q)
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (kernel compilation, allocator)
        for _ in range(2):
            attend(*x, is_sep, plan).backward(go)
    torch.cuda.current_stream().wait_stream(side)
    for t in x:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attend(*x, is_sep, plan)
        out.backward(go)
    graph.replay()
    torch.cuda.synchronize()
    want = grads(attend, q, k, v, is_sep, plan, go)
    for a, b in zip([out] + [t.grad for t in x], want):
        assert torch.equal(a, b)  # the same kernels on the same inputs: bit-equal


@pytest.mark.parametrize("backend", ["flex", "reference", "triton"])
def test_compiled_blocks_match_eager_for_each_backend(backend):
    """A small SepLLM model with its blocks compiled (inductor) gives the eager loss and gradients (fp32)."""
    from megatron_sep.config import config_from_dict
    from megatron_sep.model import build_model

    def model():
        cfg = config_from_dict(
            {
                "model": {
                    "family": "llama",
                    "num_layers": 2,
                    "hidden_size": 256,
                    "num_heads": 4,
                    "vocab_size": 512,
                    "max_position_embeddings": 1024,
                },
                "attention": {
                    "kind": "sepllm",
                    "separators": list(range(1, 52)),
                    "window": 64,
                    "backend": backend,
                },
                "data": {"seq_len": 1024},
            }
        )
        torch.manual_seed(0)
        return build_model(cfg).cuda()

    tokens = torch.randint(0, 512, (2, 1024), device="cuda")
    labels = torch.randint(0, 512, (2, 1024), device="cuda")
    eager = model()
    loss = eager(tokens, labels)
    grads = torch.autograd.grad(loss, list(eager.parameters()))
    torch._dynamo.reset()
    compiled = model()
    for block in compiled.layers:
        block.compile()
    for _ in range(2):  # a second micro-batch: no recompile, same numbers
        other = compiled(tokens, labels)
    assert abs(other.item() - loss.item()) < 1e-4
    for a, b in zip(torch.autograd.grad(other, list(compiled.parameters())), grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
