"""Beyond-window probes (inference/probes.py): the occurrence search against a brute-force loop, exact
invariance of a StreamingLLM model beyond its reach (passkey and copy distance), a dense copier scoring low on
copyable tokens, the bootstrap intervals, and `megatron-sep eval --probes`."""

import json
import math

import numpy as np
import pytest
import torch

from megatron_sep.cli import main
from megatron_sep.config import config_from_dict
from megatron_sep.data.tokenizer import load_tokenizer
from megatron_sep.inference import DecodeOptions, probes
from megatron_sep.inference.generate import feed, generate, make_cache
from megatron_sep.model import build_model
from megatron_sep.training import Trainer
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def brute_force(x: list[int]) -> list[int]:
    """The definition, literally: the last p < t with the same preceding bigram and the same next token."""
    out = [-1] * (len(x) - 1)
    for t in range(1, len(x) - 1):
        for p in range(t - 1, 0, -1):
            if (x[p - 1], x[p], x[p + 1]) == (x[t - 1], x[t], x[t + 1]):
                out[t] = t - (p + 1)
                break
    return out


def test_occurrence_search_matches_brute_force():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    for vocab in (2, 3, 4, 7):
        # rows of 41-120 tokens: with at most 343 trigrams a match is all but certain (P(none in 5 rows) < 1e-4)
        x = torch.randint(
            0, vocab, (5, 1 + int(torch.randint(40, 120, (1,), generator=g))), generator=g
        )
        d = probes.copy_distances(x)
        assert d.tolist() == [brute_force(row) for row in x.tolist()], (vocab, x)
        assert (d >= 0).any()  # tiny vocabularies repeat: the test exercises real matches
    for n in (1, 2, 3, 4):  # rows too short for any earlier trigram
        short = torch.randint(0, 2, (3, n), generator=g)
        assert probes.copy_distances(short).tolist() == [brute_force(row) for row in short.tolist()]
    # large ids: recoded, no int64 overflow
    big = torch.randint(0, 50_000, (4, 300), generator=g) * 997
    assert probes.copy_distances(big).tolist() == [brute_force(r) for r in big.tolist()]


@pytest.fixture(scope="module")
def streaming_model(corpus):
    """A StreamingLLM model (a=2, n=48, 2 layers: nothing reaches further back than 2 x 47 tokens), random
    weights scaled up so every dependence shows in the logits."""
    tok = load_tokenizer(corpus["tokenizer"])
    cfg = tiny_config(
        corpus,
        "unused",
        model={"max_position_embeddings": 192, "vocab_size": tok.vocab_size},
        data={"seq_len": 192},
        attention={"kind": "streamingllm", "window": 48, "init_tokens": 2},
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    return model, tok


def test_streaming_model_cannot_retrieve_a_passkey_beyond_its_reach(streaming_model, corpus):
    model, tok = streaming_model
    window, reach = probes.window_of(model.cfg)
    assert (window, reach) == (48, 94)
    filler = np.random.default_rng(torch.seed() % 2**31).integers(3, tok.vocab_size, 200)
    rows = {}
    for d in (0, 64):
        a, digits = probes.passkey_prompt(tok, filler, "12345", d)
        b, _ = probes.passkey_prompt(tok, filler, "67890", d)
        assert len(a) == len(b) and [i for i, (x, y) in enumerate(zip(a, b)) if x != y] == digits
        # never among the always-visible tokens
        assert min(digits) >= model.cfg.attention.init_tokens
        key_reach = len(a) - 1 - digits[-1]  # the answer's query back to the nearest digit
        with torch.no_grad():
            la, lb = model(torch.tensor([a]))[0, -1], model(torch.tensor([b]))[0, -1]
        rows[d] = key_reach, (la - lb).abs().max().item()
        outs = [
            generate(model, torch.tensor([p]), 6, DecodeOptions(cache="full"))[0, len(p) :].tolist()
            for p in (a, b)
        ]
        if key_reach > reach:
            # the decoded answer cannot depend on the key: chance accuracy
            assert outs[0] == outs[1]
    (near, near_gap), (far, far_gap) = rows[0], rows[64]
    # inside the window the key changes the answer's logits
    assert near < window and near_gap > 1e-3, rows
    assert far > reach and far_gap < 1e-6, rows  # beyond every chain of windows: identical


def test_passkey_scoring(streaming_model, monkeypatch):
    """The scoring, with decoders that know the answer: an oracle that copies the key's digits from the prompt
    scores 1, one that gets the last digit wrong scores 0 exact and 1 on the first digit."""
    model, tok = streaming_model
    plain = [i for i in range(3, tok.vocab_size) if not any(c.isdigit() for c in tok.decode([i]))]
    filler = np.random.default_rng(0).choice(plain, 400)  # no digits but the key's
    stop = tok.encode(" is")

    def decoder(wrong_last):
        def fake_generate(model, prompt, new_tokens, opts=None):
            ids = prompt[0].tolist()
            digits = [t for t in ids if tok.decode([t]).strip().isdigit()][:5]
            if wrong_last:
                digits[-1] = tok.encode(str((int(tok.decode([digits[-1]]).strip()) + 1) % 10))[-1]
            return torch.cat([prompt, torch.tensor([(digits + stop * new_tokens)[:new_tokens]])], 1)

        return fake_generate

    for wrong, exact in ((False, 1.0), (True, 0.0)):
        monkeypatch.setattr(probes, "generate", decoder(wrong))
        result = probes.passkey(model, tok, filler, [0, 40], trials=6, device=CPU, seed=3)
        assert [(r["accuracy"], r["first_digit"]) for r in result["distances"]] == [
            (exact, 1.0)
        ] * 2
        assert all(r["ci"][0] <= r["accuracy"] <= r["ci"][1] for r in result["distances"])
    assert len(set(result["keys"])) == 6 and all(
        len(k) == 5 and k.isdigit() for k in result["keys"]
    )
    with pytest.raises(ValueError, match="--passkey-distances 500: .* Fix: distances up to"):
        probes.passkey(model, tok, filler, [0, 500], trials=2, device=CPU)
    with pytest.raises(ValueError, match="held-out text holds 50 tokens"):
        probes.passkey(model, tok, filler[:50], [40], trials=2, device=CPU)


def test_the_full_cache_decodes_with_the_training_attention(streaming_model):
    """The passkey decodes through the full cache: for a StreamingLLM model it applies the training mask (initial
    tokens + window), so its logits over a prompt equal one training forward."""
    model, tok = streaming_model
    x = torch.randint(3, tok.vocab_size, (1, 150), generator=torch.Generator().manual_seed(1))
    kv = make_cache(model, "full")
    with torch.no_grad():
        chunks = torch.cat([feed(model, kv, x[:, i : i + 37]) for i in range(0, 150, 37)], 1)
        whole = model(x)
    assert (chunks - whole).abs().max().item() < 1e-4


def test_copy_distance_losses_beyond_the_reach_ignore_far_tokens(streaming_model):
    """A block repeated 138 tokens later (beyond the reach of 94): its copy's losses are the same whether or not
    the first block is there, so the far bucket scores what the model scores with nothing to copy."""
    model, tok = streaming_model
    rng = np.random.default_rng(torch.seed() % 2**31)
    rows, other = [], []
    for _ in range(3):
        x = rng.integers(3, tok.vocab_size, 193)
        x[140:170] = x[2:32]
        y = x.copy()
        # perturb only tokens far before every later query
        y[2:32] = rng.integers(3, tok.vocab_size, 30)
        rows.append(x)
        other.append(y)
    la = probes.token_losses(
        model, torch.tensor(np.stack(rows))[:, :-1], torch.tensor(np.stack(rows))[:, 1:], CPU
    )
    lb = probes.token_losses(
        model, torch.tensor(np.stack(other))[:, :-1], torch.tensor(np.stack(other))[:, 1:], CPU
    )
    assert (
        la[:, 32 + 94 :] - lb[:, 32 + 94 :]
    ).abs().max() < 1e-6  # t - j > 94 for every perturbed j
    assert (
        la[:, 32 : 32 + 94] - lb[:, 32 : 32 + 94]
    ).abs().max() > 1e-3  # closer queries do see the change
    edges = [0, 32, 64, 128]
    a = probes.copy_distance(model, rows, 3, 1, CPU, edges, n_boot=50)
    b = probes.copy_distance(model, other, 3, 1, CPU, edges, n_boot=50)
    far = probes.copy_distances(torch.tensor(np.stack(rows))) >= 128
    assert (
        a["buckets"][3]["name"] == "128+" and a["buckets"][3]["tokens"] == int(far.sum()) >= 3 * 28
    )
    assert b["buckets"][3]["tokens"] == 0  # nothing left to copy
    assert math.isclose(a["buckets"][3]["loss"], float(lb[far].mean()), rel_tol=1e-9, abs_tol=1e-6)
    assert a["sequences"] == 3 and a["tokens"] == b["tokens"] == 3 * 192
    assert sum(x["tokens"] for x in a["buckets"]) == a["tokens"]


def test_a_dense_model_trained_on_repeats_copies():
    """24 random tokens then the same 24 again (vocabulary 64): after 200 steps (fixed seed) a 2-layer dense
    model copies; copy loss ~0.02 against ~4.2 (ln 64) for the first half."""
    V, half = 64, 24
    cfg = config_from_dict(
        {
            "model": {
                "family": "llama",
                "num_layers": 2,
                "hidden_size": 64,
                "num_heads": 4,
                "num_kv_heads": 4,
                "vocab_size": V,
                "max_position_embeddings": 64,
            },
            "data": {"mock": True, "seq_len": 2 * half},
            "train": {"device": "cpu"},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    def repeats(n):
        block = torch.randint(0, V, (n, half), generator=g)
        return torch.cat([block, block, block[:, :1]], 1)

    threads = torch.get_num_threads()
    # a model this small gains nothing from threads, and waits on busy cores
    torch.set_num_threads(1)
    try:
        for _ in range(200):
            x = repeats(32)
            loss = model(x[:, :-1], x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    data = list(repeats(16).numpy())
    result = probes.copy_distance(model, data, 4, 4, CPU, [0, 16, 32], n_boot=200)
    buckets = {b["name"]: b for b in result["buckets"]}
    copy, none = buckets["16-31"], buckets["none"]
    assert copy["tokens"] >= 16 * 22 and copy["mean_distance"] == half - 1  # d = t - (p + 1) = 23
    assert copy["loss"] < math.log(V) / 2 and copy["loss"] < none["loss"] - 2, (
        copy["loss"],
        none["loss"],
    )
    assert copy["ci"][1] < none["ci"][0]
    assert len(copy["seq_sums"]) == len(copy["seq_counts"]) == 16


def test_bootstrap_intervals():
    rng = np.random.default_rng(torch.seed() % 2**31)

    def runs(n):
        counts = rng.integers(5, 40, n)
        return counts * rng.normal(3.0, 0.5, n), counts

    widths = []
    for n in (20, 400):
        sums, counts = runs(n)
        lo, hi = probes.bootstrap_ci(sums, counts, 1000, seed=1)
        point = sums.sum() / counts.sum()
        assert lo <= point <= hi
        widths.append(hi - lo)
        assert probes.paired_gap_ci((sums, counts), (sums, counts)) == (0.0, 0.0)
        # the same sequences scored 0.5 nats lower per token: a paired gap of exactly 0.5, however noisy the mean
        lo, hi = probes.paired_gap_ci((sums, counts), (sums - 0.5 * counts, counts))
        assert math.isclose(lo, 0.5) and math.isclose(hi, 0.5)
    assert widths[1] < widths[0] / 2  # 20 x the sequences: about 1/4.5 of the width
    with pytest.raises(ValueError, match="same sequences"):
        probes.paired_gap_ci(runs(5), runs(6))
    for bad in ([0, 64, 32], [4, 8], [0, 0, 8]):
        with pytest.raises(ValueError, match="--distance-edges"):
            probes.check_edges(bad)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A tiny SepLLM run trained on 192-token sequences: room for passkey prompts."""
    d = tmp_path_factory.mktemp("proberun")
    cfg = tiny_config(
        corpus,
        d / "run",
        model={"max_position_embeddings": 192},
        data={"seq_len": 192},
        train={"steps": 4, "eval_interval": 4},
        attention={"kind": "sepllm", "window": 16, "init_tokens": 2},
    )
    Trainer(cfg).run()
    return d


def test_eval_probes_writes_the_report(run, capsys):
    out = run / "eval"
    assert (
        main(
            [
                "eval",
                "--load",
                str(run / "run"),
                "--out",
                str(out),
                "--probes",
                "--distance-edges",
                "0,4,16,64",
                "--passkey-distances",
                "0,20,60",
                "--passkey-trials",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((out / "eval.json").read_text())
    cd, pk = result["probes"]["copy_distance"], result["probes"]["passkey"]
    assert [b["name"] for b in cd["buckets"]] == ["0-3", "4-15", "16-63", "64+", "none"]
    # separators carry information past any window
    assert cd["window"] == 16 and cd["reach"] is None
    assert cd["sequences"] == 2 * 4 and cd["tokens"] == 8 * 192
    assert all(len(b["seq_sums"]) == 8 for b in cd["buckets"])
    assert [r["distance"] for r in pk["distances"]] == [0, 20, 60]
    assert all(
        r["trials"] == 3 and len(r["outputs"]) == 3 and 0 <= r["accuracy"] <= 1
        for r in pk["distances"]
    )
    assert pk["chance"] == 1e-5 and pk["first_digit_chance"] == 0.1 and pk["cache"] == "full"
    for name in ("loss_by_distance.png", "passkey.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    said = capsys.readouterr().out
    assert "probe copy distance" in said and "probe passkey" in said
    # bad values: one line, exit code 2, before any evaluation
    for extra, needle in (
        (["--passkey-distances", "16,5000"], "--passkey-distances 5000"),
        (["--distance-edges", "0,64,32"], "--distance-edges 0,64,32"),
    ):
        assert (
            main(
                ["eval", "--load", str(run / "run"), "--out", str(run / "bad"), "--probes", *extra]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert (
            needle in err and "Fix:" in err and err.count("\n") == 1 and "Traceback" not in err
        ), err
    # default distances: those that fit the model's 192 positions, and the longest that does
    assert (
        main(
            [
                "eval",
                "--load",
                str(run / "run"),
                "--out",
                str(run / "e2"),
                "--probes",
                "--passkey-trials",
                "1",
                "--iters",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    got = [
        r["distance"]
        for r in json.loads((run / "e2" / "eval.json").read_text())["probes"]["passkey"][
            "distances"
        ]
    ]
    assert got[:2] == [16, 48] and 48 < got[-1] < 128
