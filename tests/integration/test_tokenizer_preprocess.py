import json
import subprocess
import sys

import numpy as np
import pytest

from data_tools.inspect_data import inspect
from data_tools.preprocess import preprocess
from data_tools.train_tokenizer import train_hf_bpe
from megatron_sep.data.indexed import IndexedDataset
from megatron_sep.data.separators import resolve_separator_ids
from megatron_sep.data.tokenizer import TokenizerError, load_tokenizer


def docs_of(jsonl):
    return [json.loads(line)["text"] for line in open(jsonl)]


def test_sentencepiece_tokenizer(corpus):
    tok = load_tokenizer(corpus["tokenizer"])
    assert tok.kind == "sentencepiece" and tok.vocab_size == 384
    assert tok.id_to_piece(tok.eod_id) == "<|endoftext|>" and tok.pad_id == 0
    text = docs_of(corpus["jsonl"])[0]
    assert tok.decode(tok.encode(text)) == text
    ids, warnings = resolve_separator_ids(tok)
    assert not warnings and len(ids) == 9  # . , ? ! ; : space tab newline all single tokens
    for s in ".,?!;:\n\t":
        assert tok.encode("a" + s)[-1] in ids


def test_hf_tokenizer(corpus, tmp_path):
    train_hf_bpe([str(corpus["jsonl"])], tmp_path / "tokenizer.json", vocab_size=400)
    tok = load_tokenizer(tmp_path)  # a folder holding tokenizer.json
    assert tok.kind == "hf" and tok.id_to_piece(tok.eod_id) == "<|endoftext|>"
    text = docs_of(corpus["jsonl"])[1]
    assert tok.decode(tok.encode(text)) == text
    ids, warnings = resolve_separator_ids(tok)
    assert len(ids) >= 6
    assert tok.encode(" ")[0] in ids and tok.encode("\n")[0] in ids


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model")


def test_preprocess_appends_eod_and_matches_across_workers(corpus, tmp_path):
    tok = load_tokenizer(corpus["tokenizer"])
    texts = docs_of(corpus["jsonl"])
    n, tokens = preprocess(
        [str(corpus["jsonl"])], corpus["tokenizer"], tmp_path / "mp", workers=2, progress=False
    )
    ds = IndexedDataset(tmp_path / "mp")
    single = IndexedDataset(corpus["prefix"])
    assert n == len(texts) == len(ds) and tokens == ds.num_tokens
    np.testing.assert_array_equal(np.asarray(ds.tokens), np.asarray(single.tokens))
    for i in (0, 7, len(texts) - 1):
        assert ds[i].tolist() == tok.encode(texts[i]) + [tok.eod_id]


def test_preprocess_plain_text_and_bad_key(corpus, tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("First document. It has two lines.\nSecond line.\n\nSecond document!\n")
    n, _ = preprocess([str(txt)], corpus["tokenizer"], tmp_path / "txt", workers=1, progress=False)
    assert n == 2
    with pytest.raises(ValueError, match="no key 'body'"):
        preprocess(
            [str(corpus["jsonl"])],
            corpus["tokenizer"],
            tmp_path / "x",
            text_key="body",
            workers=1,
            progress=False,
        )


def test_inspect_reports(corpus):
    tok = load_tokenizer(corpus["tokenizer"])
    seps = resolve_separator_ids(tok)[0]
    report = inspect(corpus["prefix"], tok, seps)
    ds = IndexedDataset(corpus["prefix"])
    assert f"documents   {len(ds):,}" in report and f"tokens      {ds.num_tokens:,}" in report
    counts = np.bincount(np.asarray(ds.tokens), minlength=tok.vocab_size)
    share = counts[seps].sum() / counts.sum()
    assert f"separator share {share:.2%}" in report and "length histogram" in report


def test_cli_data_pipeline(corpus, tmp_path):
    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "megatron_sep", *a], capture_output=True, text=True, timeout=300
        )

    p = run(
        "tokenizer",
        "train",
        "--input",
        str(corpus["jsonl"]),
        "--out",
        str(tmp_path / "tk"),
        "--vocab-size",
        "300",
        "--type",
        "unigram",
    )
    assert p.returncode == 2 and "--vocab-size" in p.stderr  # byte fallback needs more than 300
    p = run(
        "tokenizer",
        "train",
        "--input",
        str(corpus["jsonl"]),
        "--out",
        str(tmp_path / "tk"),
        "--vocab-size",
        "320",
        "--type",
        "unigram",
    )
    assert p.returncode == 0, p.stderr
    p = run(
        "preprocess",
        "--input",
        str(corpus["jsonl"]),
        "--tokenizer",
        str(tmp_path / "tk.model"),
        "--out",
        str(tmp_path / "d"),
        "--workers",
        "2",
    )
    assert p.returncode == 0, p.stderr
    assert "preprocess" in p.stderr and "docs" in p.stderr  # the progress bar
    p = run("inspect", str(tmp_path / "d"), "--tokenizer", str(tmp_path / "tk.model"))
    assert p.returncode == 0 and "separator share" in p.stdout
    p = run("inspect", str(tmp_path / "nope"))
    assert p.returncode == 2 and "not found" in p.stderr


def test_cli_hf_bpe_readme_command(corpus, tmp_path):
    """The README's `--out data/my/tok` works first time for hf-bpe, and a failed run leaves no file
    that a retry would need --force for (issue 39)."""

    def train(out, *extra):
        args = ["tokenizer", "train", "--input", str(corpus["jsonl"]), "--out", str(out), *extra]
        return subprocess.run(
            [sys.executable, "-m", "megatron_sep", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    out = tmp_path / "data" / "my" / "tok"
    p = train(out, "--type", "unigram", "--vocab-size", "300")  # too small for byte fallback
    assert p.returncode == 2 and "--vocab-size" in p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == []  # nothing half-written, no folder
    p = train(out, "--type", "hf-bpe", "--vocab-size", "400")
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in out.parent.iterdir()) == ["tok.json"]
    assert f"wrote {out}.json" in p.stdout
    assert load_tokenizer(f"{out}.json").kind == "hf"
    p = train(out, "--type", "hf-bpe", "--vocab-size", "400")
    assert p.returncode == 2 and "--force" in p.stderr
    p = train(out, "--type", "hf-bpe", "--vocab-size", "400", "--force")
    assert p.returncode == 0, p.stderr
