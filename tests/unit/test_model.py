import math

import pytest
import torch

import fused_ops
from megatron_sep.config import config_from_dict
from megatron_sep.model import build_model


def build(family, **model):
    base = {
        "family": family,
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "vocab_size": 300,
        "max_position_embeddings": 128,
    }
    if family == "neox":
        base["rotary_pct"] = 0.25
    else:
        base.update(num_kv_heads=2, tie_embeddings=True)
    base.update(model)
    return build_model(config_from_dict({"model": base, "data": {"seq_len": 64}}))


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_forward_shapes_and_causality(family):
    model = build(family).eval()
    tokens = torch.randint(0, 300, (2, 40))
    logits = model(tokens)
    assert logits.shape == (2, 40, 300)
    changed = tokens.clone()
    changed[:, 25:] = torch.randint(0, 300, (2, 15))
    out = model(changed)
    torch.testing.assert_close(out[:, :25], logits[:, :25], rtol=0, atol=1e-5)
    assert (out[:, 25:] - logits[:, 25:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_loss_matches_manual_cross_entropy(family):
    model = build(family).eval()
    tokens, labels = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    loss = model(tokens, labels)
    # padded vocab rows take part in the softmax, as in Megatron
    full = model.lm_head(model.final_norm(_hidden(model, tokens)))
    ref = torch.nn.functional.cross_entropy(
        full.reshape(-1, full.shape[-1]).double(), labels.reshape(-1)
    )
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)


def _hidden(model, tokens):
    from megatron_sep.model.attention import AttentionBatch

    return model.run_layers(model.embed(tokens), torch.arange(tokens.shape[1]), AttentionBatch())


def test_family_shapes():
    neox, llama = build("neox"), build("llama")
    assert neox.layers[0].attn.qkv.bias is not None and llama.layers[0].attn.qkv.bias is None
    assert neox.layers[0].mlp.up.out_features == 4 * 64
    assert llama.layers[0].attn.qkv.out_features == (4 + 2 * 2) * 16  # GQA: 4 q heads, 2 kv heads
    assert (
        llama.lm_head.weight is llama.embed.weight and neox.lm_head.weight is not neox.embed.weight
    )
    assert neox.padded_vocab_size == 384


def test_init_methods():
    torch.manual_seed(0)
    m = build("neox", hidden_size=256, num_layers=4)
    h, L = 256, 4
    assert abs(m.layers[0].attn.qkv.weight.std().item() - math.sqrt(2 / (5 * h))) < 2e-3
    assert abs(m.layers[0].attn.out.weight.std().item() - 2 / (L * math.sqrt(h))) < 2e-3
    m = build("llama", hidden_size=256, num_layers=8)
    assert abs(m.layers[0].mlp.up.weight.std().item() - 0.02) < 1e-3
    assert abs(m.layers[0].mlp.down.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4


def test_rope_reference_against_complex_rotation():
    b, s, h, d, rot = 2, 9, 3, 16, 8
    q, k = (
        torch.randn(b, s, h, d, dtype=torch.float64),
        torch.randn(b, s, 1, d, dtype=torch.float64),
    )
    pos = torch.randint(0, 1000, (b, s))  # arbitrary ids: packed docs, decode offsets
    q2, k2 = fused_ops.apply_rope(q, k, pos, rot, base=10000.0)
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    phase = torch.polar(
        torch.ones(b, s, rot // 2, dtype=torch.float64), pos[..., None].double() * inv
    )
    # angles are formed in fp32 (as in the kernels): error ~ |x| * pos * 2^-24 ~ 5 * 1000 * 6e-8
    tol = 5e-4
    for x, y in ((q, q2), (k, k2)):
        z = torch.complex(x[..., : rot // 2], x[..., rot // 2 : rot]) * phase[:, :, None]
        torch.testing.assert_close(y[..., : rot // 2], z.real, rtol=0, atol=tol)
        torch.testing.assert_close(y[..., rot // 2 : rot], z.imag, rtol=0, atol=tol)
        torch.testing.assert_close(y[..., rot:], x[..., rot:], rtol=0, atol=0)


def test_norm_references():
    x, w, b = torch.randn(5, 7, 48), torch.randn(48), torch.randn(48)
    ref = torch.nn.functional.layer_norm(x.double(), (48,), w.double(), b.double(), 1e-5)
    torch.testing.assert_close(
        fused_ops.layer_norm(x, w, b, 1e-5).double(), ref, rtol=1e-5, atol=1e-5
    )
    rms = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6).double(), rms, rtol=1e-5, atol=1e-5)
    r = torch.randn_like(x)
    y, s = fused_ops.rms_norm(x, w, 1e-6, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, fused_ops.rms_norm(x + r, w, 1e-6))
