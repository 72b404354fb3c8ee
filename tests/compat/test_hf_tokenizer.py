"""Exported tokenizers through transformers' AutoTokenizer give exactly the project's ids."""

import json
import random

import pytest
import transformers

from data_tools.train_tokenizer import train_hf_bpe, train_sentencepiece
from megatron_sep.convert.hf_tokenizer import sentencepiece_to_hf
from megatron_sep.data.tokenizer import load_tokenizer

from ..export_utils import export_tiny

TEXT = (
    "  Two leading spaces, then prose. Does it stop? No; it goes on: 3.14159 and 1,000,000!\n"
    "\tA tab,   three spaces and a trailing one \n"
    "Non-ASCII: naïve café, Größe, 東京, Ελληνικά and 😀 (bytes).\n\n.Starts with a separator"
)
FAMILIES = {
    "neox": {"family": "neox", "rotary_pct": 0.25},
    "llama": {"family": "llama", "num_kv_heads": 2},
}


@pytest.fixture(scope="module")
def tokenizers(corpus, tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tokenizers")
    lines = d / "lines.txt"  # sentencepiece's own defaults: NFKC charsmap, extra whitespace removed
    lines.write_text(
        "\n".join(json.loads(t)["text"] for t in open(corpus["jsonl"])) + "\nＦｕｌｌ ① ﬁ café\n"
    )
    spm.SentencePieceTrainer.train(
        input=str(lines),
        model_prefix=str(d / "nfkc"),
        vocab_size=330,
        byte_fallback=True,
        user_defined_symbols=[".", ","],
        eos_piece="<|endoftext|>",
        minloglevel=2,
    )
    return {
        "sp-bpe": corpus["tokenizer"],
        "sp-unigram": train_sentencepiece(
            [str(corpus["jsonl"])], d / "uni", vocab_size=330, model_type="unigram"
        ),
        "sp-defaults": d / "nfkc.model",
        "hf-bpe": train_hf_bpe([str(corpus["jsonl"])], d / "bpe.json", vocab_size=400),
    }


def export_with(tmp_path, tokenizer, family):
    _, out, tok = export_tiny(tmp_path, tokenizer, FAMILIES[family], num_layers=1, hidden_size=32)
    return out, tok


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", ["sp-bpe", "sp-unigram", "hf-bpe"])
def test_autotokenizer_gives_project_ids(tokenizers, tmp_path, family, kind):
    out, ours = export_with(tmp_path, tokenizers[kind], family)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    # a unigram model's trie holds the special pieces, so typed "<|endoftext|>" matches its piece there
    typed = ["<|endoftext|> typed as text"] if kind != "sp-unigram" else []
    for text in [TEXT, "x", *typed]:
        ids = ours.encode(text)
        # default call: no BOS, no EOS added
        assert theirs(text).input_ids == ids, (kind, family, text)
        assert theirs.decode(ids) == ours.decode(ids)
    assert theirs.eos_token_id == ours.eod_id and theirs.pad_token_id == ours.pad_id
    batch = theirs([TEXT, "short"], padding=True, return_tensors="pt")
    # right padding with our pad
    assert batch.input_ids[1, len(ours.encode("short")) :].eq(ours.pad_id).all()


@pytest.mark.parametrize("kind", ["sp-bpe", "sp-unigram", "sp-defaults"])
def test_sentencepiece_conversion_on_corpus_and_random_text(corpus, tokenizers, kind):
    """Every document of the test corpus and 400 random strings over separators, digits, spaces and
    multi-byte characters segment identically."""
    path = tokenizers[kind]
    ours, theirs = load_tokenizer(path), sentencepiece_to_hf(path)
    docs = [json.loads(line)["text"] for line in open(corpus["jsonl"])]
    rng = random.Random(0)
    alphabet = "ab e the .,?!;:\n\t  0123456789éü東😀Ｆ①ﬁ"
    texts = docs + ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(400)]
    bad = [t for t in texts if theirs.encode(t).ids != ours.encode(t)]
    assert not bad, bad[:3]
    assert all(
        theirs.decode(ours.encode(t), skip_special_tokens=False) == ours.decode(ours.encode(t))
        for t in texts[:50]
    )


def test_export_writes_the_tokenizer_files(tmp_path, tokenizers):
    out, _ = export_with(tmp_path, tokenizers["sp-bpe"], "llama")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert conf["tokenizer_class"] == "PreTrainedTokenizerFast" and conf["add_bos_token"] is False


def test_corrupt_sentencepiece_model_is_named(tmp_path, tokenizers):
    bad = tmp_path / "bad.model"
    bad.write_bytes(tokenizers["sp-bpe"].read_bytes()[:1000])
    with pytest.raises(ValueError, match="bad.model is not a readable sentencepiece model"):
        sentencepiece_to_hf(bad)
