"""The fused LM head + cross-entropy (model/loss.py) against the unfused F.linear + F.cross_entropy: loss and
gradients on fresh random inputs, chunked or not, in fp32 (summation order only: 1e-5) and under CPU bf16
autocast (the same bf16 matmuls; gradients summed per chunk: 2e-2 relative). The vocabulary-parallel form is
checked in test_parallel_layers.py; whole-model training with it in test_parallel_training.py."""

import pytest
import torch
import torch.nn.functional as F

from megatron_sep.model.loss import linear_cross_entropy
from tests.unit.test_model import build


def _unfused(x, w, y):
    return F.cross_entropy(F.linear(x, w).float().reshape(-1, w.shape[0]), y.reshape(-1))


def _grads(fn, x, w, y, scale):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(x, w, y)
    (loss * scale).backward()
    return loss.detach(), x.grad, w.grad


# one token per chunk, chunks that don't divide 21, one chunk
@pytest.mark.parametrize("rows", [1, 5, 7, 1000])
def test_fused_loss_equals_unfused_in_fp32(rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(3, 7, 32, generator=g), torch.randn(300, 32, generator=g) * 0.3
    y = torch.randint(0, 300, (3, 7), generator=g)
    # a non-unit upstream gradient: backward scales the saved grads
    ref = _grads(_unfused, x, w, y, 2.5)
    out = _grads(
        lambda a, b, c: linear_cross_entropy(a, b, c, chunk_bytes=4 * 300 * rows), x, w, y, 2.5
    )
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)


def test_fused_loss_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 48, generator=g), torch.randn(500, 48, generator=g) * 0.2
    y = torch.randint(0, 500, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(_unfused, x, w, y, 1.0)
        out = _grads(
            lambda a, b, c: linear_cross_entropy(a, b, c, chunk_bytes=4 * 500 * 16), x, w, y, 1.0
        )
    # same bf16 logits, fp32 softmax
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-5)
    for r, o in zip(ref[1:], out[1:]):
        assert o.dtype == r.dtype
        assert (o - r).norm() <= 2e-2 * r.norm(), ((o - r).norm(), r.norm())


def test_fused_loss_without_grad_keeps_no_gradient_buffers():
    x, w = torch.randn(10, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    y = torch.randint(0, 40, (10,))
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, y)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _unfused(x, w, y).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_model_loss_and_grads_with_and_without_fusion(family):
    """The whole model (padded vocabulary rows, tied or untied head) gives the same loss and parameter grads."""
    tokens, labels = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    grads, losses = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        model = build(family)
        model.cfg.model.fused_loss = fused
        losses.append(model(tokens, labels))
        losses[-1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)
