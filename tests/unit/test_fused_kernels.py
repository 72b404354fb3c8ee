"""Triton norms and RoPE under TRITON_INTERPRET=1 (fp32, fp16) against float64 truth and the references.

Tolerances: a kernel may be off the float64 truth by at most 2x the PyTorch reference
run in the same dtype, plus a floor of a few ulps of that dtype (the reference and the
kernel round differently, e.g. the order of the row sums).
"""

import pytest
import torch

import fused_ops

FLOOR = {torch.float32: 1e-5, torch.float16: 4e-3}


def close_enough(kernel, ref, truth, dtype, what):
    err_k = (kernel.double() - truth).abs().max().item()
    err_r = (ref.double() - truth).abs().max().item()
    scale = max(truth.abs().max().item(), 1.0)
    assert err_k <= 2 * err_r + FLOOR[dtype] * scale, (
        f"{what}: kernel err {err_k:.2e}, reference err {err_r:.2e}"
    )


def run_norm(kind, backend, x, r, w, b, gy, gs):
    x, r, w = (t.detach().clone().requires_grad_() for t in (x, r, w))
    b = b.detach().clone().requires_grad_() if b is not None else None
    if kind == "layer":
        y, s = fused_ops.layer_norm(x, w, b, 1e-5, residual=r, backend=backend)
    else:
        y, s = fused_ops.rms_norm(x, w, 1e-5, residual=r, backend=backend)
    params = [x, r, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), params)
    return [y, s, *grads]


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 33), (2, 100), (9, 1000)])
def test_norm_kernels(kind, dtype, shape):
    n = shape[-1]
    x, r, gy, gs = (torch.randn(shape) for _ in range(4))
    w, b = torch.randn(n), (torch.randn(n) if kind == "layer" else None)

    def cast(t):
        return t.to(dtype) if t is not None else None

    truth = run_norm(
        kind, "reference", *(t.double() if t is not None else None for t in (x, r, w, b, gy, gs))
    )
    ref = run_norm(kind, "reference", *map(cast, (x, r, w, b, gy, gs)))
    ker = run_norm(kind, "triton", *map(cast, (x, r, w, b, gy, gs)))
    names = ["y", "x+residual", "dx", "dresidual", "dweight", "dbias"]
    for name, k_, r_, t_ in zip(names, ker, ref, truth):
        assert k_.dtype == dtype and k_.shape == t_.shape
        close_enough(k_, r_, t_, dtype, name)


def test_norm_without_residual_and_deterministic_weight_grads():
    x, w = torch.randn(64, 48, requires_grad=True), torch.randn(48, requires_grad=True)
    y = fused_ops.rms_norm(x, w, 1e-6, backend="triton")
    torch.testing.assert_close(
        y, fused_ops.rms_norm(x, w, 1e-6, backend="reference"), rtol=1e-5, atol=1e-5
    )
    gy = torch.randn_like(y)
    first = torch.autograd.grad((y * gy).sum(), (x, w), retain_graph=True)
    again = torch.autograd.grad((y * gy).sum(), (x, w))
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # bitwise: no atomics


def run_rope(backend, q, k, pos, rot, gq, gk):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = fused_ops.apply_rope(q, k, pos, rot, 10000.0, backend=backend)
    return [qo, ko, *torch.autograd.grad((qo * gq).sum() + (ko * gk).sum(), (q, k))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b,s,hq,hk,d,rot", [(2, 5, 4, 2, 16, 16), (1, 7, 3, 1, 24, 6), (2, 3, 2, 2, 64, 32)]
)
def test_rope_kernel(dtype, b, s, hq, hk, d, rot):
    q, k = torch.randn(b, s, hq, d), torch.randn(b, s, hk, d)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    pos = torch.randint(0, 2048, (b, s))  # explicit ids: packed documents, decode offsets
    ref = run_rope(
        "reference", *(t.to(dtype) for t in (q, k)), pos, rot, gq.to(dtype), gk.to(dtype)
    )
    ker = run_rope("triton", *(t.to(dtype) for t in (q, k)), pos, rot, gq.to(dtype), gk.to(dtype))
    for name, k_, r_ in zip(["q", "k", "dq", "dk"], ker, ref):
        assert k_.dtype == dtype
        # both form angles in fp32 (pos * inv_freq): they differ by ~pos * 2^-24 rad per element
        tol = 2e-4 if dtype == torch.float32 else 4e-3
        torch.testing.assert_close(k_.float(), r_.float(), rtol=0, atol=tol, msg=name)
        if rot < d:
            assert torch.equal(k_[..., rot:], r_[..., rot:]), name  # pass-through is a copy


def test_rope_kernel_reads_strided_qkv_views():
    b, s, hk, g, d = 2, 6, 2, 2, 16
    qkv = torch.randn(b, s, hk, g + 2, d)
    k_view = qkv[:, :, :, g]  # the model's k: a strided view of the fused projection
    q = qkv[:, :, :, :g].reshape(b, s, hk * g, d)
    pos = torch.arange(s) + 100  # a KV-cache offset, shared by the batch
    got = fused_ops.apply_rope(q, k_view, pos, d, 10000.0, backend="triton")
    want = fused_ops.apply_rope(q, k_view.contiguous(), pos, d, 10000.0, backend="reference")
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=0, atol=2e-4)


def test_no_grad_calls_launch_the_kernels_directly_with_the_same_results():
    """Without autograd the fused ops skip their custom op's dispatch (host time in eager decoding): the same
    kernel runs either way, so outputs are bitwise equal."""
    x, r, w, b = torch.randn(4, 40), torch.randn(4, 40), torch.randn(40), torch.randn(40)
    q, k, pos = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 2, 16), torch.arange(3) + 7
    with torch.no_grad():
        plain = (
            *fused_ops.layer_norm(x, w, b, 1e-5, r, "triton"),
            fused_ops.rms_norm(x, w, 1e-6, None, "triton"),
            *fused_ops.apply_rope(q, k, pos, 16, 10000.0, "triton"),
        )
    x, q = x.requires_grad_(), q.requires_grad_()  # through the custom ops
    op = (
        *fused_ops.layer_norm(x, w, b, 1e-5, r, "triton"),
        fused_ops.rms_norm(x, w, 1e-6, None, "triton"),
        *fused_ops.apply_rope(q, k, pos, 16, 10000.0, "triton"),
    )
    assert all(t.grad_fn is not None for t in (op[0], op[2], op[3]))
    assert all(torch.equal(a, c.detach()) for a, c in zip(plain, op))


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_model_loss_and_grads_same_with_kernels(family):
    from megatron_sep.config import config_from_dict
    from megatron_sep.model import build_model

    model = {
        "family": family,
        "num_layers": 2,
        "hidden_size": 48,
        "num_heads": 4,
        "vocab_size": 64,
        "max_position_embeddings": 64,
        "rotary_pct": 0.5 if family == "neox" else 1.0,
    }
    if family == "llama":
        model["num_kv_heads"] = 2
    out = {}
    tokens = torch.randint(0, 64, (2, 17))
    for kernels in ("reference", "triton"):
        torch.manual_seed(0)
        m = build_model(
            config_from_dict({"model": {**model, "kernels": kernels}, "data": {"seq_len": 32}})
        )
        loss = m(tokens[:, :-1], tokens[:, 1:])
        out[kernels] = [loss] + list(torch.autograd.grad(loss, list(m.parameters())))
    for a, c in zip(out["triton"], out["reference"]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_every_launch_names_each_kernel_parameter_once(monkeypatch):
    """Launch sites pass a kernel's parameters by keyword: each one, and nothing else. The interpreter drops an
    unknown keyword where a GPU build refuses it, so the names are checked here."""
    from fused_ops import norms_triton, rope_triton
    from fused_ops import sep_attention_kernels as kernels
    from fused_ops import sep_attention_triton as sat

    seen = {}
    for kernel in (
        norms_triton._norm_fwd,
        norms_triton._norm_bwd,
        rope_triton._rope_kernel,
        kernels.fwd_kernel,
        kernels.dq_kernel,
        kernels.dkdv_kernel,
    ):

        def run(*args, kernel=kernel, launch=kernel.run, **kwargs):
            names = set(kwargs) - {"grid", "warmup", "num_warps", "num_stages"}
            assert not args and names == set(kernel.arg_names), (
                kernel.__name__,
                names ^ set(kernel.arg_names),
            )
            seen[kernel.__name__] = seen.get(kernel.__name__, 0) + 1
            return launch(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    x, r, w, b = (
        torch.randn(*shape, requires_grad=True) for shape in ((3, 40), (3, 40), (40,), (40,))
    )
    sum(fused_ops.layer_norm(x, w, b, 1e-5, r, "triton")).sum().backward()
    q, k = (
        torch.randn(1, 3, 4, 16, requires_grad=True),
        torch.randn(1, 3, 2, 16, requires_grad=True),
    )
    torch.cat(
        fused_ops.apply_rope(q, k, torch.arange(3), 8, 10000.0, "triton"), dim=2
    ).sum().backward()
    q, k, v = (torch.randn(1, h, 20, 16, requires_grad=True) for h in (2, 1, 1))
    small = {name: {"BM": 16, "BN": 16} for name in ("fwd", "dq", "dkdv")}
    sat.sep_attention_triton(q, k, v, torch.rand(1, 20) < 0.3, 2, 4, config=small).sum().backward()
    assert seen == {
        "_norm_fwd": 1,
        "_norm_bwd": 1,
        "_rope_kernel": 2,
        "fwd_kernel": 1,
        "dq_kernel": 1,
        "dkdv_kernel": 2,
    }
