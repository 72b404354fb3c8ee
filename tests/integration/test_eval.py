"""`megatron-sep eval`: the validation perplexity equals the trainer's, loss by position, streaming
perplexity with SepCache / StreamingLLM, the report files, and bad input."""

import json
import math

import pytest

from megatron_sep.cli import main
from megatron_sep.training import Trainer
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A tiny SepLLM run with one validation at its last step (the checkpoint of that step)."""
    d = tmp_path_factory.mktemp("evalrun")
    cfg = tiny_config(
        corpus,
        d / "run",
        train={"steps": 4, "eval_interval": 4},
        attention={"kind": "sepllm", "window": 8, "init_tokens": 2},
    )
    Trainer(cfg).run()
    logged = [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    return d, [x["val_loss"] for x in logged if "val_loss" in x][-1]


def test_eval_equals_the_trainers_validation_and_writes_the_report(run, capsys):
    d, val = run
    out = d / "eval1"
    assert (
        main(
            [
                "eval",
                "--load",
                str(d / "run"),
                "--out",
                str(out),
                "--stream-tokens",
                "300",
                "--chunk",
                "16",
                "--segment",
                "100",
                "--cache-sizes",
                "2,4,8,24",
                "--cache",
                "sep,streaming,full",
                "--no-progress",
            ]
        )
        == 0
    )
    result = json.loads((out / "eval.json").read_text())
    # the same batches and model
    assert abs(result["val_loss"] - val) < 1e-6, (result["val_loss"], val)
    assert math.isclose(result["val_ppl"], math.exp(val), rel_tol=1e-6)
    pos = result["loss_by_position"]
    assert len(pos["per_position"]) == 32 and len(pos["buckets"]) == 32
    runs = {r["cache"]: r for r in result["streaming"]}
    assert [s["tokens"] for s in runs["sep"]["segments"]] == [100, 100, 100]
    assert [s["tokens"] for s in result["stream_reference"]["segments"]] == [100, 100, 100]
    # bounded caches hold at most the capacity (2 layers, 2 kv heads of 8 dims, fp32: 256 bytes a token);
    # the full cache grows with the stream
    per_token = 2 * 2 * 2 * 8 * 4
    # capacity + one chunk during its attention
    assert runs["sep"]["peak_kv_bytes"] <= (24 + 16) * per_token
    assert runs["full"]["peak_kv_bytes"] >= 300 * per_token
    for r in runs.values():
        assert math.isfinite(r["ppl"]) and r["tokens_per_s"] > 0 and r["stopped"] is None
        assert all(s["tokens_per_s"] > 0 for s in r["segments"])
    for name in (
        "loss_by_position.png",
        "streaming_ppl.png",
        "kv_memory.png",
        "streaming_speed.png",
        "streaming_ppl_ratio.png",
    ):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    said = capsys.readouterr().out
    assert "validation loss" in said and "cache sep" in said


def test_eval_on_a_text_file_and_bad_input(run, tmp_path, capsys):
    d, _ = run
    text = tmp_path / "doc.jsonl"
    text.write_text(
        "\n".join(
            json.dumps({"text": "The model reads, and writes. Does it stop? No; " * 8})
            for _ in range(6)
        )
    )
    assert (
        main(
            [
                "eval",
                "--load",
                str(d / "run"),
                "--out",
                str(tmp_path / "e"),
                "--text",
                str(text),
                "--iters",
                "2",
                "--micro-batch",
                "2",
                "--seq-len",
                "16",
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["source"] == str(text)
    # past --time-limit a stream stops after the chunk in flight and reports the tokens it reached
    assert (
        main(
            [
                "eval",
                "--load",
                str(d / "run"),
                "--out",
                str(tmp_path / "t"),
                "--text",
                str(text),
                "--iters",
                "1",
                "--micro-batch",
                "1",
                "--seq-len",
                "16",
                "--stream-tokens",
                "0.2K",  # 200: counts take K and M
                "--chunk",
                "16",
                "--cache",
                "sep,full",
                "--time-limit",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    for r in json.loads((tmp_path / "t" / "eval.json").read_text())["streaming"]:
        assert (r["tokens"], r["stopped"], r["segments"][0]["tokens"]) == (16, "time", 16), r
    assert "stopped early: time" in capsys.readouterr().out
    cases = [
        (["--out", str(tmp_path / "e")], "is not empty"),  # never overwrites without --force
        (
            ["--out", str(tmp_path / "f"), "--text", str(text), "--stream-tokens", "100000"],
            "fewer than --stream",
        ),
        (
            ["--out", str(tmp_path / "g"), "--text", str(text), "--iters", "500"],
            "Fix: lower --iters",
        ),
        (
            [
                "--out",
                str(tmp_path / "h"),
                "--stream-tokens",
                "50",
                "--cache-sizes",
                "4,64,256,100",
            ],
            "capacity=100 must exceed",
        ),
        (["--out", str(tmp_path / "i"), "--seq-len", "4096"], "max_position_embeddings"),
    ]
    for extra, needle in cases:
        assert main(["eval", "--load", str(d / "run"), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    # a stream longer than the corpus is refused before any evaluation runs (the run's own corpus here)
    argv = ["eval", "--load", str(d / "run"), "--out", str(tmp_path / "k"), "--stream-tokens", "1M"]
    assert main(argv) == 2
    said = capsys.readouterr()
    assert "fewer than --stream-tokens" in said.err and "validation loss" not in said.out, said
    # argparse's own exit, with the message of the count parser
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "eval",
                "--load",
                str(d / "run"),
                "--out",
                str(tmp_path / "j"),
                "--stream-tokens",
                "4Q",
            ]
        )
    assert exit_.value.code == 2 and "'4Q' is not a token count" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert (
        main(["eval", "--load", str(d / "run"), "--out", str(tmp_path / "j"), "--text", str(bad)])
        == 2
    )
    assert "line 1 is not a JSON object" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--load",
                str(d / "run"),
                "--out",
                str(tmp_path / "e"),
                "--force",
                "--iters",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )


def test_the_no_cache_reference_equals_the_full_cache_within_one_block(run):
    """With one block as long as the stream, the reference is one forward over it with the training attention,
    which the full cache computes chunk by chunk: equal per segment (fp32 on CPU, to 1e-4)."""
    import torch

    from megatron_sep.checkpoint import load_model
    from megatron_sep.inference import evaluate as ev

    d, _ = run
    model, cfg = load_model(d / "run")
    stream = torch.randint(
        0, cfg.model.vocab_size, (61,), generator=torch.Generator().manual_seed(3)
    )
    ref = ev.block_perplexity(model, stream, 60, 20, 1, torch.device("cpu"))
    full = ev.streaming_perplexity(model, stream, "full", None, "original", 7, 20, progress=False)
    assert [s["tokens"] for s in ref["segments"]] == [20, 20, 20]
    for a, b in zip(ref["segments"], full["segments"]):
        assert math.isclose(a["ppl"], b["ppl"], rel_tol=1e-4), (a, b)
    # blocks restart from scratch: shorter blocks see less context and give another number
    assert not math.isclose(
        ev.block_perplexity(model, stream, 10, 20, 4, torch.device("cpu"))["ppl"],
        ref["ppl"],
        rel_tol=1e-4,
    )
