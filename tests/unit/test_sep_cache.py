"""SepCache (the paper's fixed-capacity streaming KV cache) against independent references.

Every comparison is fp32 on CPU: the cache and the reference compute the same attention over the same
keys in a different order of operations, so 1e-5 covers the rounding."""

import pytest
import torch
import torch.nn.functional as F

from megatron_sep.config import config_from_dict
from megatron_sep.inference import SepCache
from megatron_sep.inference.static_sep_cache import StaticSepCache
from megatron_sep.model import build_model

# both bounded caches: the fixed-shape one (CUDA graphs, streaming eval) must give SepCache's results
CACHES = [SepCache, StaticSepCache]


SEPS = [1, 2, 3]


def model(family="llama", window=5, init=2, kind="sepllm", kv_heads=1):
    cfg = config_from_dict(
        {
            "model": {
                "family": family,
                "num_layers": 2,
                "hidden_size": 32,
                "num_heads": 2,
                "num_kv_heads": kv_heads,
                "vocab_size": 40,
                "max_position_embeddings": 1024,
            },
            "attention": {
                "kind": kind,
                "separators": SEPS,
                "window": [window, 1024],
                "init_tokens": init,
                "backend": "reference",
            },
            "data": {"seq_len": 1024},
        }
    )
    torch.manual_seed(0)
    return build_model(cfg).eval()


def stream(b=2, s=80, seed=0):
    """Token rows with different separator counts (row 0 ~10%, row 1 ~30%)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 40, (b, s), generator=g)
    for r, share in enumerate((0.1, 0.3)[:b]):
        hits = torch.rand(s, generator=g) < share
        tokens[r, hits] = torch.randint(1, 4, (int(hits.sum()),), generator=g)
    return tokens


@torch.no_grad()
def decode(m, tokens, cache, chunk=1):
    """Logits [b, s, vocab] for every position, feeding the stream `chunk` tokens at a time."""
    out, lengths = [], []
    for t in range(0, tokens.shape[1], chunk):
        piece = tokens[:, t : t + chunk]
        pos = cache.begin(piece)
        out.append(m(piece, position_ids=pos, cache=cache))
        lengths.append(held(cache))
    return torch.cat(out, 1), lengths


def held(cache) -> int:
    """Entries the fullest row holds after the step just fed."""
    if isinstance(cache, StaticSepCache):
        return int(cache.entries().max())
    return cache.kv[0][0].shape[2]


def retained_before(is_sep, a, s, w, c):
    """The paper's rule, one token at a time in plain Python: R[t] = positions cached when token t arrives."""
    kept, out = [], []
    for t in range(len(is_sep)):
        out.append(set(kept))
        kept.append(t)
        if len(kept) >= c:
            init = [p for p in kept if p < a]
            local = [p for p in kept if p > t - w]
            seps = [p for p in kept if is_sep[p] and a <= p <= t - w]
            kept = sorted(set(init + (seps[-s:] if s else []) + local))
    return out


@torch.no_grad()
def reference_logits(m, tokens, allowed):
    """One full forward where query t of row r sees key j iff allowed[r, t, j] and the model's own mask."""
    layers = list(m.layers.values()) if hasattr(m.layers, "values") else list(m.layers)
    a = m.cfg.attention
    windows = a.layer_windows(m.cfg.model.num_layers, m.cfg.model.max_position_embeddings)
    s = tokens.shape[1]
    i = torch.arange(s)
    keep = torch.isin(tokens, m.sep_ids) | (i < a.init_tokens)[None, :]
    saved = [layer.attn.core for layer in layers]
    for layer, n in zip(layers, windows):
        mask = allowed & (i[None, :] <= i[:, None])[None]
        if n is not None:
            mask = mask & (keep[:, None, :] | (i[:, None] - i[None, :] < n)[None])
        layer.attn.core = lambda q, k, v, batch, dropout, mask=mask: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], enable_gqa=k.shape[1] != q.shape[1]
        )
    try:
        return m(tokens)
    finally:
        for layer, core in zip(layers, saved):
            layer.attn.core = core


@pytest.mark.parametrize("Cache", CACHES)
@pytest.mark.parametrize("family", ["llama", "neox"])
def test_without_compression_equals_full_sepllm(family, Cache):
    m = model(family)
    tokens = stream()
    full = m(tokens).detach()
    cache = Cache(m.cfg, m.sep_ids, init=4, seps=64, window=16, capacity=200)
    logits, _ = decode(m, tokens, cache)
    torch.testing.assert_close(logits, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("Cache", CACHES)
@pytest.mark.parametrize("family,chunk", [("llama", 1), ("neox", 1), ("llama", 7), ("llama", 80)])
def test_with_compression_equals_attention_over_retained_keys(family, chunk, Cache):
    """Capacity 12 over 80 tokens: many compressions; chunked prefill (7, and all 80 at once) gives each
    query the keys retained at its own step, so every chunking equals the one-token reference."""
    m = model(family)
    tokens = stream()
    a, s, w, c = 2, 3, 4, 12
    is_sep = torch.isin(tokens, m.sep_ids)
    allowed = torch.zeros(2, 80, 80, dtype=torch.bool)
    for r in range(2):
        for t, kept in enumerate(retained_before(is_sep[r].tolist(), a, s, w, c)):
            allowed[r, t, list(kept) + [t]] = True
    ref = reference_logits(m, tokens, allowed)
    cache = Cache(m.cfg, m.sep_ids, init=a, seps=s, window=w, capacity=c)
    logits, _ = decode(m, tokens, cache, chunk)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
    # the reference really dropped keys: it differs from the uncompressed model
    assert (ref - m(tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("Cache", CACHES)
def test_length_stays_bounded_over_a_long_stream(Cache):
    """A stream 20x the capacity: after every step each row holds at most `capacity` entries."""
    m = model()
    c = 24
    tokens = stream(s=20 * c, seed=1)
    cache = Cache(m.cfg, m.sep_ids, init=2, seps=6, window=8, capacity=c)
    _, lengths = decode(m, tokens, cache)
    assert max(lengths) <= c and int(cache.entries().max()) <= c
    assert min(lengths[c:]) >= 2 + 8  # initial + window always there once the stream is long enough


@pytest.mark.parametrize("Cache", CACHES)
def test_cache_positions_match_original_until_something_is_dropped(Cache):
    """positions='cache' rotates by slot; with nothing dropped the slots are the stream positions."""
    m = model()
    tokens = stream(s=40)
    a = Cache(m.cfg, m.sep_ids, init=4, seps=8, window=16, capacity=100)
    b = Cache(m.cfg, m.sep_ids, init=4, seps=8, window=16, capacity=100, positions="cache")
    torch.testing.assert_close(decode(m, tokens, b)[0], decode(m, tokens, a)[0], rtol=0, atol=1e-5)
    small = Cache(m.cfg, m.sep_ids, init=2, seps=3, window=4, capacity=12, positions="cache")
    logits, lengths = decode(m, stream(s=200), small)  # positions stay below the capacity
    assert max(lengths) <= 12 and torch.isfinite(logits).all()


@pytest.mark.parametrize("Cache", CACHES)
def test_streaming_cache_and_bad_input(Cache):
    m = model(kind="streamingllm")
    with pytest.raises(ValueError, match="separator token ids"):
        Cache(m.cfg, m.sep_ids)
    cache = Cache(m.cfg, m.sep_ids, init=2, seps=0, window=6, capacity=10, streaming=True)
    _, lengths = decode(m, stream(s=60), cache)
    assert max(lengths) <= 10
    with pytest.raises(ValueError, match="capacity=300 must exceed"):
        Cache(model().cfg, torch.tensor(SEPS), init=4, seps=64, window=256, capacity=300)


def test_generate_with_sep_cache_and_chunked_prefill():
    """generate(cache='sep') without compression decodes the same tokens as the full cache, with the prompt
    fed whole or 5 tokens at a time; a small capacity still generates, within its bound."""
    from megatron_sep.inference import DecodeOptions, generate

    m = model()
    prompt = stream(s=23)
    full = generate(m, prompt, 12)
    for chunk in (0, 5):
        out = generate(
            m,
            prompt,
            12,
            DecodeOptions(cache="sep", cache_sizes=(4, 16, 32, 100), prefill_chunk=chunk),
        )
        assert torch.equal(out, full)
        assert torch.equal(generate(m, prompt, 12, DecodeOptions(prefill_chunk=chunk)), full)
    small = generate(
        m, prompt, 30, DecodeOptions(cache="sep", cache_sizes=(2, 3, 4, 12), prefill_chunk=4)
    )
    assert small.shape == (2, 53)


@pytest.mark.parametrize("positions", ["original", "cache"])
@pytest.mark.parametrize("kind", ["sepllm", "fixed_interval"])
def test_fixed_shape_cache_equals_sep_cache_over_a_long_stream(kind, positions):
    """The fixed-shape cache against SepCache over 30x its capacity, fed in uneven chunks (7, a 40-token
    prefill that grows its buffers, 1-token steps, the last one short), GQA with 2 query heads per KV head,
    rows with different separator shares: the same logits (fp32, 1e-5) and the same entries per row after
    every step. Its buffers never change size after the prefill, and its retention never syncs with the
    host (checked by the round count: a chunk of 7 with a gap of 3 between compressions needs 3 rounds)."""
    m = model(kind=kind, kv_heads=1, window=4)
    sizes = dict(init=2, seps=3, window=4, capacity=12, positions=positions)
    tokens = stream(s=360, seed=3)
    ref, fixed = (
        SepCache(m.cfg, m.sep_ids, **sizes),
        StaticSepCache(m.cfg, m.sep_ids, chunk=7, **sizes),
    )
    cuts = [0, 7, 14, 54, 55, 56, *range(63, 360, 7), 360]
    widths = set()
    with torch.no_grad():
        for a, b in zip(cuts[:-1], cuts[1:]):
            piece = tokens[:, a:b]
            want = m(piece, position_ids=ref.begin(piece), cache=ref)
            got = m(piece, position_ids=fixed.begin(piece), cache=fixed)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            ref._commit()
            assert torch.equal(fixed.entries(), ref.entries())
            if a >= 14:
                widths.add(fixed.kv[0][0].shape[2])
    assert widths == {12 + 40}  # grown once, for the 40-token prefill
    assert int(fixed.t0) == fixed.length == 360
    from megatron_sep.inference.sep_cache import max_compressions

    assert max_compressions(7, (2, 3, 4, 12)) == 3 and max_compressions(1, (2, 3, 4, 12)) == 1


def test_fixed_shape_cache_refuses_rollback_and_reports_bytes():
    m = model()
    cache = StaticSepCache(m.cfg, m.sep_ids, init=2, seps=3, window=4, capacity=12, chunk=4)
    assert cache.held_bytes() == 0
    with torch.no_grad():
        for t in range(0, 40, 4):
            piece = stream(s=40)[:, t : t + 4]
            m(piece, position_ids=cache.begin(piece), cache=cache)
    # 2 layers x (k, v) x 1 kv head x 16 dims x 4 bytes per entry, summed over both rows' entries
    assert cache.held_bytes() == int(cache.entries().sum()) * 2 * 2 * 16 * 4
    assert cache.allocated_bytes() == 2 * 2 * 2 * (12 + 4) * 16 * 4
    with pytest.raises(ValueError, match="keeps no copies to roll back"):
        cache.mark()
