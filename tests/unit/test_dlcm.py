"""DLCM (model.arch: dlcm) on one process: causality, the boundary rule and the compression loss against a
direct float64 computation, pooling, decoding through the caches against full recomputation, muP groups."""

import pytest
import torch

from megatron_sep.config import ConfigError, config_from_dict
from megatron_sep.model import DLCM, build_model
from megatron_sep.model import dlcm_model
from megatron_sep.model.dlcm import compression_loss, pool


def dlcm_config(**dlcm):
    return config_from_dict(
        {
            "model": {
                "arch": "dlcm",
                "num_layers": 3,
                "hidden_size": 32,
                "num_heads": 4,
                "num_kv_heads": 2,
                "vocab_size": 97,
                "max_position_embeddings": 64,
            },
            "attention": {"kind": "sepllm", "window": 4, "init_tokens": 2, "separators": [5, 6, 7]},
            "dlcm": {
                "encoder_layers": 2,
                "concept_layers": 2,
                "concept_hidden_size": 48,
                "concept_heads": 4,
                "concept_kv_heads": 2,
                **dlcm,
            },
            "data": {"seq_len": 48},
        }
    )


VARIANTS = [
    (pooling, boundary)
    for pooling in ("mean", "boundary")
    for boundary in ("learned", "separator", "fixed")
]


@pytest.mark.parametrize("pooling,boundary", VARIANTS)
def test_future_tokens_leave_past_logits_bit_equal(pooling, boundary):
    """Every token after t replaced: the logits up to t stay bit-equal (the concept count, so the padded
    backbone length, stays the same: 49 slots for 48 tokens at most). A mean-pooled model that let a token
    see its own open segment's concept (one slot further) fails the same check."""
    torch.manual_seed(0)
    model = build_model(dlcm_config(pooling=pooling, boundary=boundary, concept_bucket=64)).eval()
    assert isinstance(model, DLCM)
    a = torch.randint(0, 97, (2, 48))
    for t in (0, 17, 40):
        b = a.clone()
        b[:, t + 1 :] = torch.randint(0, 97, (2, 47 - t))
        with torch.no_grad():
            la, lb = model(a), model(b)
        assert torch.equal(la[:, : t + 1], lb[:, : t + 1]), (t, pooling, boundary)
        assert (la[:, t + 1 :] - lb[:, t + 1 :]).abs().max() > 1e-3


def test_the_causality_check_catches_a_leak(monkeypatch):
    torch.manual_seed(0)
    model = build_model(dlcm_config(pooling="mean", boundary="fixed", target_ratio=4)).eval()
    leak = dlcm_model.visible_slots
    monkeypatch.setattr(dlcm_model, "visible_slots", lambda limit, n: leak(limit + 1, n))
    a = torch.randint(0, 97, (1, 48))
    b = a.clone()
    b[:, 22:] = torch.randint(0, 97, (1, 26))  # token 21 is in the segment 20..23
    with torch.no_grad():
        moved = (model(a)[:, 20:22] - model(b)[:, 20:22]).abs().max()
    assert moved > 1e-3


def test_router_and_boundaries_match_a_float64_computation():
    """p_t = (1 - cos(W_q h_{t-1}, W_k h_t)) / 2, p_0 = 1, boundaries where p >= 0.5; W_q = W_k = I at
    the start; a separator forces a boundary on the next token."""
    torch.manual_seed(1)
    model = build_model(dlcm_config(boundary="separator")).train()
    assert torch.equal(model.router.q.weight, torch.eye(32))
    with torch.no_grad():
        for w in (model.router.q.weight, model.router.k.weight):
            w.add_(0.3 * torch.randn_like(w))
    h = torch.randn(2, 20, 32)
    tokens = torch.randint(8, 97, (2, 20))
    tokens[0, 5] = tokens[1, 11] = 6  # separators
    p, b = model.route(h, tokens, torch.arange(20), None)
    q = h.double() @ model.router.q.weight.double().T
    k = h.double() @ model.router.k.weight.double().T
    cos = (q[:, :-1] * k[:, 1:]).sum(-1) / (q[:, :-1].norm(dim=-1) * k[:, 1:].norm(dim=-1))
    want = torch.cat([torch.ones(2, 1, dtype=torch.float64), (1 - cos) / 2], 1)
    want[0, 6] = want[1, 12] = 1.0
    torch.testing.assert_close(p.double(), want, atol=1e-6, rtol=0)
    assert torch.equal(b, p >= 0.5) and b[0, 6] and b[1, 12] and b[:, 0].all()


def test_fixed_boundaries_every_ratio_tokens():
    model = build_model(dlcm_config(boundary="fixed", target_ratio=3))
    assert model.router is None
    _, b = model.route(
        torch.zeros(1, 10, 32), torch.zeros(1, 10, dtype=torch.long), torch.arange(10), None
    )
    assert b[0].tolist() == [i % 3 == 0 for i in range(10)]


@pytest.mark.parametrize("per_sequence", [False, True])
def test_compression_loss_and_its_gradient_match_the_formula(per_sequence):
    """L = R/(R-1) ((R-1) F G + (1-F)(1-G)) - 1 in float64 (global: over every token; sequence: per row,
    averaged); dL/dp = R/(R-1) (R F - 1) / N flows through G only; zero at F = G = 1/R."""
    torch.manual_seed(2)
    r = 4.0
    p = torch.rand(3, 16, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, 16) < 0.4
    loss, f = compression_loss(p, b, r, per_sequence=per_sequence)
    loss.backward()

    def formula(pp, bb):
        g, ff = pp.mean(), bb.double().mean()
        return r / (r - 1) * ((r - 1) * ff * g + (1 - ff) * (1 - g)) - 1, ff

    if per_sequence:
        rows = [formula(p[i].detach(), b[i]) for i in range(3)]
        want = sum(x for x, _ in rows) / 3
        grad = torch.stack(
            [
                torch.full((16,), r / (r - 1) * (r * ff - 1) / 16 / 3, dtype=torch.float64)
                for _, ff in rows
            ]
        )
    else:
        want, ff = formula(p.detach(), b)
        grad = torch.full((3, 16), (r / (r - 1) * (r * ff - 1) / 48).item(), dtype=torch.float64)
    torch.testing.assert_close(loss.detach(), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(p.grad, grad, atol=1e-12, rtol=0)
    at_target, _ = compression_loss(
        torch.full((1, 8), 0.25, dtype=torch.float64), torch.arange(8)[None] % 4 == 0, r
    )
    assert abs(at_target.item()) < 1e-12


def test_pooling_means_and_first_tokens():
    h = torch.randn(1, 7, 4)
    b = torch.tensor([[1, 0, 0, 1, 0, 1, 0]], dtype=torch.bool)
    seg = b.long().cumsum(1) - 1
    mean = pool(h, seg, b, 4, "mean")
    for j, (lo, hi) in enumerate([(0, 3), (3, 5), (5, 7)]):
        torch.testing.assert_close(mean[0, j], h[0, lo:hi].mean(0))
    assert mean[0, 3].abs().max() == 0  # past the last segment
    first = pool(h, seg, b, 4, "boundary")
    torch.testing.assert_close(first[0, :3], h[0, [0, 3, 5]])


@pytest.mark.parametrize("pooling,boundary", VARIANTS)
def test_decoding_through_the_caches_equals_recomputation(pooling, boundary):
    """Prompt in one piece and in chunks of 5, then 12 new tokens one at a time: every step's logits equal
    a full forward over the final tokens (fp32; only the order of sums differs: 1e-5). The backbone's cache
    holds exactly the null slot and the concepts completed so far."""
    from megatron_sep.inference import DecodeOptions
    from megatron_sep.inference.generate import generate, make_cache

    torch.manual_seed(3)
    model = build_model(dlcm_config(pooling=pooling, boundary=boundary)).eval()
    prompt = torch.randint(0, 97, (1, 9))
    for chunk in (0, 5):
        tokens, steps = generate(
            model, prompt, 12, DecodeOptions(prefill_chunk=chunk), output_logits=True
        )
        with torch.no_grad():
            full = model(tokens)[:, 8:-1].float()
        assert (full - steps).abs().max().item() < 1e-5, chunk
    kv = make_cache(model, "full")
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            model(tokens[:, t : t + 1], position_ids=kv.begin(tokens[:, t : t + 1]), cache=kv)
        _, b = model.route(model.encode(tokens), tokens, torch.arange(tokens.shape[1]), None)
    started = int(b.sum())
    done = started + 1 if pooling == "boundary" else started
    assert kv.concepts.backbone.kv[0][0].shape[2] == done  # null + complete concepts
    assert kv.concepts.cross[0][0].shape[2] == done


def test_decoding_refuses_what_it_does_not_serve():
    from megatron_sep.inference.generate import make_cache

    model = build_model(dlcm_config())
    with pytest.raises(ValueError, match="full cache only"):
        make_cache(model, "sep")
    kv = make_cache(model, "full")
    with pytest.raises(ValueError, match="one sequence at a time"):
        kv.begin(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="speculative"):
        kv.mark()


def test_mup_scales_the_backbone_init_and_learning_rate():
    from megatron_sep.engine.native import decay_groups, lr_scales

    torch.manual_seed(4)
    plain = build_model(dlcm_config())
    torch.manual_seed(4)
    mup = build_model(dlcm_config(mup=True))
    w = 48 / 32
    a, b = plain.concept_layers[0].attn.qkv.weight, mup.concept_layers[0].attn.qkv.weight
    torch.testing.assert_close(b, a / w**0.5)
    torch.testing.assert_close(mup.layers[0].attn.qkv.weight, plain.layers[0].attn.qkv.weight)
    groups = decay_groups(list(mup.parameters()), 0.1, lr_scales(mup))
    scaled = [g for g in groups if g.get("lr_scale")]
    ids = {id(p) for g in scaled for p in g["params"]}
    want = {id(p) for p in mup.concept_layers.parameters() if p.dim() >= 2}
    assert ids == want and all(g["lr_scale"] == pytest.approx(1 / w) for g in scaled)
    assert [g["weight_decay"] for g in groups[:2]] == [0.1, 0.0]  # the base groups first, as before


@pytest.mark.parametrize(
    "section,key,value,words",
    [
        ("dlcm", "encoder_layers", 3, "at least one"),
        ("dlcm", "target_ratio", 1.0, "must be > 1"),
        ("dlcm", "concept_heads", 5, "does not divide"),
        ("parallel", "pp", 2, "not served with model.arch: dlcm"),
        ("parallel", "cp", 2, "not served with model.arch: dlcm"),
        ("model", "structure", "T(T)T", "SUBLLM"),
    ],
)
def test_bad_dlcm_settings_name_the_key(section, key, value, words):
    raw = {
        "model": {"arch": "dlcm", "num_layers": 3, "hidden_size": 32, "num_heads": 4},
        "dlcm": {"encoder_layers": 2, "concept_hidden_size": 48, "concept_heads": 4},
        "data": {"seq_len": 32},
    }
    raw.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=words) as e:
        config_from_dict(raw)
    assert f"{section}.{key}" in str(e.value) or key in str(e.value)


def test_flops_count_the_backbone_at_its_concepts():
    """MFU's FLOPs: the backbone's matmuls per concept (1/ratio of a token's), the token stacks per token."""
    from megatron_sep.training.metrics import dlcm_flops_per_token, matmul_params

    cfg = dlcm_config()
    model = build_model(cfg)
    n = matmul_params(model)
    backbone = sum(p.numel() for p in model.concept_layers.parameters() if p.dim() >= 2)
    up = model.up.weight.numel()
    f4, f2 = dlcm_flops_per_token(cfg, 4.0), dlcm_flops_per_token(cfg, 2.0)
    # the matmul part: every matmul weight counted once, the backbone's and the up projection's at 1/ratio
    attn = lambda r: 3 * 12.0 * 32 * 48 + 2 * 12.0 * 48 * 48 / r**2 + 6.0 * 32 * 48 / r  # noqa: E731
    assert f4 - attn(4) == pytest.approx(6.0 * (n - backbone - up + (backbone + up) / 4))
    assert f2 - attn(2) == pytest.approx(6.0 * (n - backbone - up + (backbone + up) / 2))


def test_dlcm_keys_without_the_arch_are_refused():
    """A dlcm key on a plain model would be silently unused: one line naming it."""
    with pytest.raises(ConfigError, match="dlcm.encoder_layers=3: is set but model.arch is 'gpt'"):
        config_from_dict({"dlcm": {"encoder_layers": 3}})
    config_from_dict({"dlcm": {}})  # the defaults (as every saved config.yaml holds them) are fine


def test_eviction_in_the_token_layers_changes_nothing():
    """--evict drops token keys no later query sees (SepLLM's window): the same tokens, logits within fp32
    rounding of the full cache's."""
    from megatron_sep.inference import DecodeOptions
    from megatron_sep.inference.generate import generate

    torch.manual_seed(3)
    model = build_model(dlcm_config()).eval()
    prompt = torch.randint(0, 97, (1, 9))
    a, la = generate(model, prompt, 20, DecodeOptions(), output_logits=True)
    b, lb = generate(model, prompt, 20, DecodeOptions(evict=True), output_logits=True)
    assert torch.equal(a, b) and (la - lb).abs().max() < 1e-5
