"""Speculative decoding (inference/speculative.py) against decoding with the target alone (CPU, fp32).

Greedy must give the target's greedy tokens exactly: the draft is the target with perturbed weights, so it
agrees often but not always and every round both keeps and rolls back proposals. Sampling must follow the
target's distribution: a chi-square test over many seeded runs, which a wrong acceptance rule fails."""

import copy
from dataclasses import replace

import pytest
import torch

from megatron_sep.config import config_from_dict
from megatron_sep.inference import DecodeOptions, generate
from megatron_sep.inference.generate import filtered_probs, make_cache
from megatron_sep.inference.speculative import check_pair, speculative_generate
from megatron_sep.model import build_model


from ..conftest import tiny_config
from .test_data_safety import assert_one_line_error, cli

SEPS = [1, 2, 3]


def model(family="llama", kind="dense", vocab=40, layers=2, seed=0, **extra):
    attention = {"kind": kind, "backend": "reference"}
    if kind == "sepllm":
        attention.update(separators=SEPS, window=6, init_tokens=2)
    attention.update(extra)
    cfg = config_from_dict(
        {
            "model": {
                "family": family,
                "num_layers": layers,
                "hidden_size": 32,
                "num_heads": 2,
                "num_kv_heads": 1,
                "vocab_size": vocab,
                "max_position_embeddings": 256,
            },
            "attention": attention,
            "data": {"seq_len": 256},
        }
    )
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def perturbed(m, scale=0.3, seed=1):
    """The target with noise on every weight: a draft that agrees with it often, not always."""
    d = copy.deepcopy(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return d


def prompt(seed=0, n=12, vocab=40):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(4, vocab, (1, n), generator=g)
    t[0, ::4] = 1  # separators for the SepLLM models
    return t


CACHES = {
    "full": {},
    "full-evict": {"evict": True},
    "sep": {"cache": "sep", "cache_sizes": (2, 3, 6, 14)},
    "streaming": {"cache": "streaming", "cache_sizes": (2, 0, 6, 10)},
    "static": {"cache": "static"},
}


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize(
    "kind,cache",
    [
        ("dense", "full"),
        ("sepllm", "full"),
        ("sepllm", "full-evict"),
        ("sepllm", "sep"),
        ("sepllm", "streaming"),
        ("dense", "static"),
        ("sepllm", "static"),
    ],
)
def test_greedy_equals_target_only(kind, cache, k):
    target = model(kind=kind)
    draft = perturbed(target)
    opts = DecodeOptions(**CACHES[cache])
    ref = generate(target, prompt(), 40, opts)
    out, stats = speculative_generate(target, draft, prompt(), 40, replace(opts, draft_tokens=k))
    assert torch.equal(out, ref)
    assert 0 < stats.accepted < stats.proposed  # rounds kept some proposals and rolled back others
    assert stats.target_passes < 40 and stats.new_tokens == 40
    # none past the end
    assert stats.proposed <= stats.rounds * k and stats.proposed + stats.rounds >= 40


def test_device_rounds_stop_at_eod_and_a_one_token_prompt_takes_the_host_loop():
    """Greedy decoding with static caches runs each round as device work (inference/device_rounds.py); it must
    stop where target-only decoding stops at eod_id, and a prompt too short for its two-token draft feed
    falls back to the host loop with the same output."""
    target = model(kind="sepllm")
    draft = perturbed(target)
    ref = generate(target, prompt(), 40)
    eod = int(ref[0, prompt().shape[1] + 17])  # a token the target produces mid-way
    want = generate(target, prompt(), 40, DecodeOptions(eod_id=eod))
    assert want.shape[1] < ref.shape[1]
    for k in (1, 4):
        out, stats = speculative_generate(
            target, draft, prompt(), 40, DecodeOptions(draft_tokens=k, eod_id=eod, cache="static")
        )
        assert torch.equal(out, want) and stats.new_tokens == want.shape[1] - prompt().shape[1]
    one = prompt()[:, :1]
    out, _ = speculative_generate(
        target, draft, one, 20, DecodeOptions(draft_tokens=3, cache="static")
    )
    assert torch.equal(out, generate(target, one, 20))
    # nothing wanted
    out, stats = speculative_generate(target, draft, prompt(), 0, DecodeOptions(cache="static"))
    assert torch.equal(out, prompt()) and stats.rounds == stats.proposed == 0


def test_draft_of_another_family_and_a_dense_draft_for_a_sepllm_target():
    target = model(kind="sepllm", family="neox")
    for draft in (model(kind="dense", family="llama", layers=1, seed=3), perturbed(target)):
        ref = generate(target, prompt(), 24, DecodeOptions(evict=True))
        out, _ = speculative_generate(
            target, draft, prompt(), 24, DecodeOptions(draft_tokens=3, evict=True)
        )
        assert torch.equal(out, ref)
    _, stats = speculative_generate(target, draft, prompt(), 1, DecodeOptions(draft_tokens=8))
    assert stats.proposed == 1  # proposals stop at the tokens still wanted


@torch.no_grad()
@pytest.mark.parametrize("cache", list(CACHES))
def test_rollback_leaves_the_cache_as_if_the_tokens_were_never_fed(cache):
    """Rounds as a decoder runs them: mark, feed 7 tokens in 3 steps, roll back to keep 2, 0 or all 7, then
    feed the next token. Its logits must equal those of a fresh cache fed only the kept tokens (the SepCache
    compresses inside the rolled-back spans here, so its replay is exercised)."""
    m = model(kind="sepllm")
    opts = CACHES[cache]
    args = (
        opts.get("cache", "full"),
        opts.get("cache_sizes", (4, 64, 256, 512)),
        opts.get("positions", "original"),
        opts.get("evict", False),
    )
    tokens = prompt(seed=4, n=48)

    def feed(kv, t):
        return m(t, position_ids=kv.begin(t), cache=kv)[:, -1]

    kv = make_cache(m, *args, capacity=64)
    feed(kv, tokens[:, :16])
    done = 16
    for keep in (2, 0, 7, 3):
        kv.mark()
        span = tokens[:, done : done + 7]
        for piece in (span[:, :1], span[:, 1:4], span[:, 4:]):
            feed(kv, piece)
        kv.rollback(done + keep)
        done += keep
        fresh = make_cache(m, *args, capacity=64)
        feed(fresh, tokens[:, :done])
        assert kv.length == fresh.length == done
        nxt = tokens[:, done : done + 1]
        assert torch.allclose(feed(kv, nxt), feed(fresh, nxt), atol=1e-5)
        done += 1


@pytest.mark.parametrize("kind", ["dense", "sepllm", "fixed_interval"])
def test_static_cache_gives_the_full_caches_logits(kind):
    """The preallocated cache (what CUDA graphs replay) attends over its whole buffer under the mask: the
    same logits as the growing cache to fp32 rounding (1e-5 on logits of about unit size), prompt fed whole
    or in chunks."""
    m = model(kind=kind, **({"fixed_interval": 3, "window": 6} if kind == "fixed_interval" else {}))
    for chunk in (0, 5):
        opts = DecodeOptions(prefill_chunk=chunk)
        ref, ref_logits = generate(m, prompt(n=20), 30, opts, output_logits=True)
        out, logits = generate(
            m, prompt(n=20), 30, replace(opts, cache="static"), output_logits=True
        )
        assert torch.equal(out, ref)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_static_cache_and_cuda_graphs_refuse_what_they_cannot_do():
    m = model(kind="sepllm")
    kv = make_cache(m, "static", capacity=10)
    kv.begin(prompt(n=64)[:, :60])
    with pytest.raises(
        ValueError, match="holds 64 positions; 5 more tokens at length 60 do not fit"
    ):
        kv.begin(prompt(n=5))
    with pytest.raises(ValueError, match="keeps every key.*Fix: use --cache full with --evict"):
        generate(m, prompt(), 4, DecodeOptions(cache="static", evict=True))
    with pytest.raises(ValueError, match="--evict changes the shape"):
        generate(m, prompt(), 4, DecodeOptions(cache="full", evict=True, cuda_graphs=True))
    with pytest.raises(ValueError, match="the sep cache is the fixed-shape SepCache.*roll"):
        speculative_generate(m, model(), prompt(), 4, DecodeOptions(cache="sep", cuda_graphs=True))
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        generate(m, prompt(), 4, DecodeOptions(cuda_graphs=True))
    with pytest.raises(ValueError, match="the draft is the target model itself"):
        speculative_generate(m, m, prompt(), 4, DecodeOptions(cuda_graphs=True))


def test_graphs_kept_on_a_model_stay_behind_when_it_is_copied_or_pickled():
    """CUDA graphs cannot be copied: a deep copy or a pickle of a model that decoded with them starts empty."""
    import pickle
    from megatron_sep.inference.graphs import Kept

    m = model()
    m.__dict__["_decode_graphs"] = Kept({(256,): object()})
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert other.__dict__["_decode_graphs"] == {} and isinstance(
            other.__dict__["_decode_graphs"], Kept
        )
        assert torch.equal(other(prompt()), m(prompt()))


def test_rollback_needs_a_mark_and_a_length_inside_the_round():
    m = model()
    kv = make_cache(m, "full")
    kv.begin(prompt()[:, :4])
    with pytest.raises(RuntimeError, match="without mark"):
        kv.rollback(2)
    kv.mark()
    with pytest.raises(ValueError, match="between the marked length 4 and the current length 4"):
        kv.rollback(2)


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test. A draw in a cell of probability 0 fails outright; cells expected below 5 are pooled
    into one (the usual validity rule)."""
    zero = expected == 0
    if observed[zero].sum() > 0:
        return 0.0
    observed, expected = observed[~zero], expected[~zero]
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum(0, keepdim=True)])
    exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2)
    )


VOCAB, SAMPLES, SAMPLING = 6, 1500, dict(greedy=False, temperature=0.8, top_k=5, top_p=0.95)


@pytest.fixture(scope="module")
def tiny_vocab_pair():
    """A 6-token target and an independent draft, each made peaked so their distributions differ a lot."""
    target, draft = model(vocab=VOCAB, layers=1, seed=10), model(vocab=VOCAB, layers=1, seed=11)
    with torch.no_grad():
        target.lm_head.weight.mul_(8)
        draft.lm_head.weight.mul_(8)
    p = torch.tensor([[3, 1, 4]])
    return target, draft, p


def target_joint(target, p):
    """The target's exact distribution of its first two sampled tokens, under the same filtering: [V * V]."""
    with torch.no_grad():
        first = filtered_probs(
            target(p)[:, -1], **{k: SAMPLING[k] for k in ("temperature", "top_k", "top_p")}
        )[0]
        rows = torch.cat([p.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)
        second = filtered_probs(
            target(rows)[:, -1], **{k: SAMPLING[k] for k in ("temperature", "top_k", "top_p")}
        )
    return (first[:, None] * second).reshape(-1)


def sampled_counts(target, draft, p, **kw):
    counts = torch.zeros(VOCAB * VOCAB, dtype=torch.float64)
    for seed in range(SAMPLES):
        out, _ = speculative_generate(
            target, draft, p, 2, DecodeOptions(draft_tokens=3, seed=seed, **SAMPLING), **kw
        )
        counts[out[0, -2] * VOCAB + out[0, -1]] += 1
    return counts


def test_sampling_follows_the_target_distribution(tiny_vocab_pair):
    """Chi-square at significance 0.001 (a correct sampler fails by chance once in 1,000 seeds; the seeds
    are fixed, so the outcome is reproducible). The two distributions are far apart (checked), so the draft's
    own distribution would be rejected."""
    target, draft, p = tiny_vocab_pair
    expected = target_joint(target, p) * SAMPLES
    draft_joint = target_joint(draft, p)
    # total variation: the test has power
    assert 0.5 * (draft_joint - expected / SAMPLES).abs().sum() > 0.3
    assert chi_square_p(sampled_counts(target, draft, p), expected) > 1e-3


def test_a_wrong_acceptance_rule_fails_the_same_test(tiny_vocab_pair):
    """Keeping every proposal (accept = 1) samples the draft's distribution: the p-value collapses."""
    target, draft, p = tiny_vocab_pair
    expected = target_joint(target, p) * SAMPLES
    counts = sampled_counts(target, draft, p, accept=lambda pt, qt: torch.ones_like(pt))
    assert chi_square_p(counts, expected) < 1e-6


def test_mismatched_pairs_and_batches_are_refused():
    with pytest.raises(
        ValueError, match="draft's vocabulary \\(50 tokens\\) differs from the target's \\(40\\)"
    ):
        check_pair(model(), model(vocab=50))
    sub = build_model(
        config_from_dict(
            {
                "model": {
                    "num_layers": 2,
                    "hidden_size": 32,
                    "num_heads": 2,
                    "vocab_size": 40,
                    "structure": "T(T)",
                    "subsample_keep": 0.5,
                }
            }
        )
    )
    with pytest.raises(ValueError, match="draft is a SUBLLM model"):
        check_pair(model(), sub)
    with pytest.raises(ValueError, match="batch 1"):
        speculative_generate(model(), model(), prompt().expand(2, -1), 4)
    with pytest.raises(ValueError, match="positions='cache'.*Fix: use --cache-positions original"):
        speculative_generate(
            model(), model(), prompt(), 4, DecodeOptions(cache="streaming", positions="cache")
        )
    with pytest.raises(ValueError, match="--prefill-chunk applies to plain decoding"):
        speculative_generate(model(), model(), prompt(), 4, DecodeOptions(prefill_chunk=2))


def test_generate_command_with_a_draft(corpus, tmp_path):
    from megatron_sep.training import Trainer
    from data_tools.train_tokenizer import train_sentencepiece

    for name, layers in (("target", 2), ("draft", 1)):
        Trainer(
            tiny_config(
                corpus,
                tmp_path / name,
                model={"num_layers": layers},
                train={"steps": 2},
                checkpoint={"save_interval": 2},
            )
        ).run()
    proc = cli(
        "generate",
        "--load",
        tmp_path / "target",
        "--draft",
        tmp_path / "draft",
        "--draft-tokens",
        "3",
        "--prompt",
        "The model reads.",
        "--max-new-tokens",
        "12",
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    assert "speculative decoding, up to 3 draft tokens per round: acceptance" in proc.stderr
    assert "tokens per target pass" in proc.stderr and "tokens/s" in proc.stderr
    plain = cli(
        "generate",
        "--load",
        tmp_path / "target",
        "--prompt",
        "The model reads.",
        "--max-new-tokens",
        "12",
    )
    assert plain.stdout == proc.stdout  # greedy: the same text as the target alone
    static = cli(
        "generate",
        "--load",
        tmp_path / "target",
        "--draft",
        tmp_path / "draft",
        "--cache",
        "static",
        "--prompt",
        "The model reads.",
        "--max-new-tokens",
        "12",
    )
    assert static.returncode == 0 and static.stdout == plain.stdout, static.stderr
    assert_one_line_error(
        cli(
            "generate",
            "--load",
            tmp_path / "target",
            "--cuda-graphs",
            "--device",
            "cpu",
            "--prompt",
            "x",
        ),
        "CUDA graphs need the model on a CUDA device",
    )
    other = train_sentencepiece([str(corpus["jsonl"])], tmp_path / "other", vocab_size=400)
    assert_one_line_error(
        cli(
            "generate",
            "--load",
            tmp_path / "target",
            "--draft",
            tmp_path / "draft",
            "--draft-tokenizer",
            other,
            "--prompt",
            "x",
        ),
        "the draft's tokenizer",
    )
    assert_one_line_error(
        cli("generate", "--load", tmp_path / "target", "--draft-tokens", "3", "--prompt", "x"),
        "--draft-tokens set without --draft",
    )
    assert_one_line_error(
        cli(
            "generate",
            "--load",
            tmp_path / "target",
            "--draft",
            tmp_path / "draft",
            "--draft-cache",
            "sep",
            "--prompt",
            "x",
        ),
        "the draft's KV cache (--draft-cache sep)",
        "--cache streaming",
    )
