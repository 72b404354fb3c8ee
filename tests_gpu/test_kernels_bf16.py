"""GPU tests (run on the device: `PYTHONPATH=. python3 -m pytest -q tests_gpu`; not part of the CPU suite).

Each Triton kernel in bf16 against the PyTorch reference in fp32, on fresh random inputs. Tolerance:
the kernel's relative L2 error may be at most 2x that of the reference itself run in bf16, plus 2e-3
(rounding order differs between the two, and bf16 has 8 bits of mantissa: ~4e-3 per rounding)."""

import pytest
import torch

import fused_ops

if not torch.cuda.is_available():
    raise RuntimeError("tests_gpu needs a CUDA device; the CPU suite is tests/")
BF16 = torch.bfloat16


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def outputs(fn, inputs, dtype, grad_out):
    x = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*x)
    out.backward(grad_out.to(dtype))
    return [out.detach()] + [t.grad for t in x]


def check(fn_kernel, fn_ref, inputs, grad_out):
    truth = outputs(fn_ref, inputs, torch.float32, grad_out)
    kern = outputs(fn_kernel, inputs, BF16, grad_out)
    ref16 = outputs(fn_ref, inputs, BF16, grad_out)
    for i, (a, r, t) in enumerate(zip(kern, ref16, truth)):
        err, ref_err = rel(a, t), rel(r, t)
        assert err <= 2 * ref_err + 2e-3, (i, err, ref_err)


@pytest.mark.parametrize(
    "b,hq,hk,s,d,density,window,split",
    [
        (2, 8, 4, 1000, 64, 0.1, 7, None),
        (1, 8, 8, 2047, 128, 0.3, 256, None),
        (2, 4, 1, 777, 128, 1.0, 1, None),
        (1, 16, 16, 4096, 128, 0.1, 64, None),
        (2, 8, 2, 3000, 128, 0.05, 256, 3),
    ],
)
def test_sep_attention_triton_bf16(b, hq, hk, s, d, density, window, split):
    q, k, v = (torch.randn(b, h, s, d, device="cuda") for h in (hq, hk, hk))
    is_sep = (
        torch.rand(b, s, device="cuda")
        < density * torch.linspace(0.5, 1, b, device="cuda")[:, None]
    )
    cfg = {"dkdv": {"split": split}} if split else None
    from fused_ops.sep_attention_triton import sep_attention_triton

    check(
        lambda *x: sep_attention_triton(*x, is_sep, 3, window, config=cfg),
        lambda *x: fused_ops.sep_attention(
            *x, is_sep, init_tokens=3, window=window, backend="reference"
        ),
        (q, k, v),
        torch.randn(b, hq, s, d, device="cuda"),
    )


@pytest.mark.parametrize(
    "docs,window,cfg",
    [
        (6, 256, None),
        (40, 64, None),
        (3, 128, {"dkdv": {"split": 3}}),
        (
            5,
            256,
            {
                "fwd": {
                    "BM": 128,
                    "BN": 128,
                    "num_warps": 8,
                    "num_stages": 2,
                    "TMA": 1,
                    "HEADS_FIRST": 1,
                },
                "dq": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3, "TMA": 1},
            },
        ),
    ],
)
def test_sep_attention_triton_documents_and_launch_variants_bf16(docs, window, cfg):
    """segment_ids (document resets) in the kernel, and the TMA / heads-first launch shapes, in bf16."""
    b, hq, hk, s = 2, 8, 2, 4096
    q, k, v = (torch.randn(b, h, s, 128, device="cuda") for h in (hq, hk, hk))
    is_sep = torch.rand(b, s, device="cuda") < 0.15
    seg = torch.zeros(b, s, dtype=torch.long, device="cuda")
    seg[:, torch.randperm(s - 1)[:docs] + 1] = 1
    seg = seg.cumsum(1)
    from fused_ops.sep_attention_triton import sep_attention_triton

    check(
        lambda *x: sep_attention_triton(*x, is_sep, 3, window, config=cfg, segment_ids=seg),
        lambda *x: fused_ops.sep_attention(
            *x, is_sep, init_tokens=3, window=window, backend="reference", segment_ids=seg
        ),
        (q, k, v),
        torch.randn(b, hq, s, 128, device="cuda"),
    )


@pytest.mark.parametrize("s,hk,docs", [(4096, 16, 0), (12000, 4, 7)])
def test_sep_attention_triton_atomic_dq_bf16(s, hk, docs):
    """deterministic=False (list dQ through fp32 atomics), short and long (tensor-descriptor) sequences."""
    b, hq = 1, 16
    q, k, v = (torch.randn(b, h, s, 128, device="cuda") for h in (hq, hk, hk))
    is_sep = torch.rand(b, s, device="cuda") < 0.1
    seg = None
    if docs:
        seg = torch.zeros(b, s, dtype=torch.long, device="cuda")
        seg[:, torch.randperm(s - 1)[:docs] + 1] = 1
        seg = seg.cumsum(1)
    from fused_ops.sep_attention_triton import sep_attention_triton

    check(
        lambda *x: sep_attention_triton(*x, is_sep, 3, 256, segment_ids=seg, deterministic=False),
        lambda *x: fused_ops.sep_attention(
            *x, is_sep, init_tokens=3, window=256, backend="reference", segment_ids=seg
        ),
        (q, k, v),
        torch.randn(b, hq, s, 128, device="cuda"),
    )


def test_sep_attention_auto_is_triton_and_deterministic():
    """No atomics: two backward passes give bitwise equal gradients."""
    q, k, v = (
        torch.randn(1, 8, 3000, 128, device="cuda", dtype=BF16, requires_grad=True)
        for _ in range(3)
    )
    is_sep = torch.rand(1, 3000, device="cuda") < 0.1
    go = torch.randn_like(q)
    grads = []
    for _ in range(2):
        o = fused_ops.sep_attention(q, k, v, is_sep, init_tokens=3, window=128)  # auto
        grads.append(torch.autograd.grad(o, (q, k, v), go))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    from fused_ops.sep_attention_triton import sep_attention_triton

    assert torch.equal(o, sep_attention_triton(q, k, v, is_sep, 3, 128))


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norms_bf16(kind):
    x, res = torch.randn(4096, 4096, device="cuda"), torch.randn(4096, 4096, device="cuda")
    w, bias = torch.randn(4096, device="cuda"), torch.randn(4096, device="cuda")
    go = torch.randn(4096, 4096, device="cuda")

    def make(backend):
        if kind == "rms":
            return lambda x, r, w: sum(fused_ops.rms_norm(x, w, 1e-6, residual=r, backend=backend))
        return lambda x, r, w, b: sum(
            fused_ops.layer_norm(x, w, b, 1e-5, residual=r, backend=backend)
        )

    inputs = (x, res, w) if kind == "rms" else (x, res, w, bias)
    check(make("triton"), make("reference"), inputs, go)


def test_rope_bf16():
    q, k = torch.randn(2, 2048, 16, 128, device="cuda"), torch.randn(2, 2048, 4, 128, device="cuda")
    pos = torch.arange(2048, device="cuda").expand(2, -1) + torch.tensor([[0], [37]], device="cuda")
    go = torch.randn(2, 2048, 20, 128, device="cuda")

    def make(backend):
        return lambda q, k: torch.cat(
            fused_ops.apply_rope(q, k, pos, 96, 10000.0, backend=backend), dim=2
        )

    check(make("triton"), make("reference"), (q, k), go)
