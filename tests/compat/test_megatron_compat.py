"""Coming from Megatron-LM / GPT-NeoX: sentence-split corpora written by megatron-core's own builder,
their key names and value forms, GPT-2 BPE tokenizer files."""

import json
import warnings

import numpy as np
import pytest

from megatron_sep.config import ConfigError, config_from_dict
from megatron_sep.data.dataset import PackedDataset, build_datasets, split_ranges
from megatron_sep.data.indexed import IndexedDataset, IndexedDatasetWriter

EOD = 0


# its numpy.array(tensor) call
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron")


def _megatron_builder():
    with warnings.catch_warnings():  # megatron-core warns that Transformer Engine / Apex are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


def sentence_split_corpus(prefix, docs=40, seed=0):
    """What `preprocess_data.py --split-sentences --append-eod` writes: one sequence per sentence, EOD after a
    document's last sentence, documents closed in doc_idx. Returns each document's tokens."""
    rng = np.random.default_rng(seed)
    import torch

    builder = _megatron_builder()(f"{prefix}.bin", dtype=np.uint16)
    out = []
    for _ in range(docs):
        sentences = [
            rng.integers(1, 300, rng.integers(2, 9)).astype(np.uint16)
            for _ in range(rng.integers(1, 6))
        ]
        sentences[-1] = np.append(sentences[-1], np.uint16(EOD))
        for s in sentences:
            builder.add_item(torch.from_numpy(s.astype(np.int64)))
        builder.end_document()
        out.append(np.concatenate(sentences))
    builder.finalize(f"{prefix}.idx")
    return out


def test_documents_are_doc_idx_ranges(tmp_path):
    docs = sentence_split_corpus(tmp_path / "c")
    ix = IndexedDataset(tmp_path / "c")
    assert ix.num_docs == len(docs) and len(ix) > len(docs)  # more sentences than documents
    for d, want in enumerate(docs):
        assert np.array_equal(ix.get_doc(d), want)
    # packing shuffles documents: the stream is whole documents back to back, sentences in order
    seq = 16
    ds = PackedDataset(ix, (0, ix.num_docs), seq, None, seed=3)
    assert sorted(ds.doc_order[: ix.num_docs].tolist()) == list(range(len(docs)))
    stream = np.concatenate([docs[d] for d in ds.doc_order])
    for i in range(len(ds)):
        start = int(ds.shuffle[i]) * seq
        assert np.array_equal(ds[i], stream[start : start + seq + 1])
    # the splits cut between documents: the validation stream holds exactly the valid documents
    lo, hi = split_ranges(ix.num_docs, [0.7, 0.3, 0.0])[1]
    _, valid, _ = build_datasets([str(tmp_path / "c")], None, [0.7, 0.3, 0.0], seq, 1, (8, 4, 0))
    assert set(valid.doc_order.tolist()) == set(range(lo, hi))
    assert sum(len(docs[d]) for d in range(lo, hi)) == int(valid.doc_end[len(range(lo, hi)) - 1])


def test_reset_per_document_segments_follow_documents(tmp_path):
    import torch

    from megatron_sep.model.attention import sep_inputs

    docs = sentence_split_corpus(tmp_path / "c")
    ds = PackedDataset(IndexedDataset(tmp_path / "c"), (0, len(docs)), 64, None, seed=0)
    cfg = config_from_dict(
        {
            "model": {"vocab_size": 300, "max_position_embeddings": 64},
            "data": {"mock": True, "seq_len": 64},
            "attention": {
                "kind": "streamingllm",
                "window": 8,
                "reset_per_document": True,
                "eod_id": EOD,
            },
        }
    )
    tokens = torch.from_numpy(ds[0][:-1])[None]
    segments = sep_inputs(cfg, tokens, torch.tensor([]))["segment_ids"][0]
    ends = np.flatnonzero(tokens[0].numpy() == EOD)  # one EOD per document, none per sentence
    assert int(segments[-1]) == len(ends) - (tokens[0, -1] == EOD).item()
    assert all(int(segments[e]) == k for k, e in enumerate(ends))  # an EOD closes its own document


def test_our_files_equal_megatron_core_builders(tmp_path):
    import torch

    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 60000, rng.integers(1, 50)).astype(np.uint16) for _ in range(30)]
    builder = _megatron_builder()(str(tmp_path / "m.bin"), dtype=np.uint16)
    with IndexedDatasetWriter(tmp_path / "ours", np.uint16) as w:
        for d in docs:
            w.add_document(d)
            builder.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    builder.finalize(str(tmp_path / "m.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"m.{ext}").read_bytes()


def test_inspect_counts_documents_and_names_a_tokenizer_mismatch(tmp_path, corpus):
    from data_tools.inspect_data import inspect
    from megatron_sep.data.tokenizer import load_tokenizer

    docs = sentence_split_corpus(tmp_path / "c")
    text = inspect(tmp_path / "c")
    assert f"documents   {len(docs)}" in text and "sequences" in text and "sentence-split" in text
    small = load_tokenizer(corpus["tokenizer"])  # 384 ids; the corpus holds ids up to 299: fits
    assert "top 20 tokens" in inspect(tmp_path / "c", small)
    with IndexedDatasetWriter(tmp_path / "big", np.uint16) as w:
        w.add_document(np.array([5, 9000, 7], dtype=np.uint16))
    with pytest.raises(
        ValueError, match="token id 9000, outside the tokenizer's vocabulary of 384"
    ):
        inspect(tmp_path / "big", small)


@pytest.mark.parametrize(
    "section,key,want",
    [
        ("train", "train_iters", "train.steps"),
        ("model", "num_attention_heads", "model.num_heads"),
        ("parallel", "tensor_model_parallel_size", "parallel.tp"),
        ("model", "num_query_groups", "model.num_kv_heads"),
        ("optim", "lr_decay_style", "optim.schedule"),
        ("model", "train_iters", "train.steps"),
    ],
)
def test_megatron_names_point_to_our_keys(section, key, want):
    """The issue's five misleading 'did you mean' hints, and an alias in the wrong section."""
    with pytest.raises(ConfigError, match=f"{key} is {want}.*Fix: write {want} instead"):
        config_from_dict({section: {key: 1}})
    with pytest.raises(ConfigError, match=f"{key} is {want}"):
        config_from_dict({}, [f"{key}=1"])  # no section at all, as on Megatron's command line
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        config_from_dict({"model": {"num_layerz": 1}})  # not an alias: the closest key as before


def test_megatron_split_and_weighted_paths():
    cfg = config_from_dict(
        {"data": {"mock": True}}, ["data.split=969,30,1", "data.paths=0.3 /a/x 0.7 /b/y"]
    )
    assert cfg.data.split == [969.0, 30.0, 1.0]
    assert cfg.data.paths == ["/a/x", "/b/y"] and cfg.data.weights == [0.3, 0.7]
    cfg = config_from_dict({"data": {"paths": ["2", "/a/x", "1", "/b/y"], "split": "98/1/1"}})
    assert (
        cfg.data.paths == ["/a/x", "/b/y"]
        and cfg.data.weights == [2.0, 1.0]
        and cfg.data.split == [98, 1, 1]
    )
    assert config_from_dict({"data": {"paths": "/a/x /b/y"}}).data.paths == ["/a/x", "/b/y"]
    with pytest.raises(ConfigError, match="data.split.*Megatron's 'train,valid,test' string"):
        config_from_dict({"data": {"split": "96,x,1"}})


def _gpt2_files(tmp_path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        [json.loads(line)["text"] for line in open(corpus["jsonl"])],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 and Megatron ship them
    return tmp_path / "vocab.json", tmp_path / "merges.txt"


def test_gpt2_bpe_files_encode_as_transformers_gpt2_tokenizer(tmp_path, corpus):
    import transformers

    from megatron_sep.data.tokenizer import load_tokenizer

    vocab, merges = _gpt2_files(tmp_path, corpus)
    # the slow, pure-Python GPT-2 tokenizer
    ref = transformers.GPT2Tokenizer(str(vocab), str(merges))
    texts = [json.loads(line)["text"] for line in open(corpus["jsonl"])][:20]
    texts.append("Tabs\tand  spaces, digits 12345 and üñí <|endoftext|>next")
    for path in (vocab, tmp_path, merges):  # the vocab file, the folder, or the merges file
        tok = load_tokenizer(path)
        assert tok.eod_id == ref.convert_tokens_to_ids("<|endoftext|>")
        for text in texts:
            ids = tok.encode(text)
            assert ids == ref.encode(text) and tok.decode(ids) == text


def test_tokenizer_file_errors_are_one_line(tmp_path, corpus):
    from megatron_sep.data.tokenizer import TokenizerError, load_tokenizer

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"}}')
    (tmp_path / "g").mkdir()
    vocab, merges = _gpt2_files(tmp_path / "g", corpus)
    merges.unlink()
    for path, msg in (
        (tmp_path / "tokenizer.json", "is not an HF tokenizer.json"),
        (vocab, "no merges.txt lies beside it"),
        (tmp_path / "none", "not found"),
    ):
        with pytest.raises(TokenizerError, match=msg) as e:
            load_tokenizer(path)
        assert "\n" not in str(e.value)


def test_bad_set_values_and_shared_names_are_one_line():
    """Found by a new-user trial: invalid YAML in --set, infinite splits, odd weighted paths, our own keys
    without their section, a GPT-NeoX file given to train."""
    cases = (
        ({}, ["optim.lr=[1"], "not valid YAML"),
        ({}, ["data.split=inf,1,1"], "finite"),
        ({}, ["data.paths=0.3 A 0.7"], "give a path after every weight"),
        ({}, ["data.paths=0.3 A 0.7 B", "data.weights=[0.5,0.5]"], "already carries weights"),
        ({}, ["num_layers=2"], "write model.num_layers"),
        ({"lr": 1e-3}, [], "write optim.lr"),
        ({"attention-config": [[["global"], 2]]}, [], "import-neox"),
    )
    for raw, overrides, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            config_from_dict({"data": {"mock": True}, **raw}, overrides)
        assert "\n" not in str(e.value)


def test_a_broken_tokenizer_json_in_a_folder_is_named_as_one(tmp_path):
    from megatron_sep.data.tokenizer import TokenizerError, load_tokenizer

    (tmp_path / "tokenizer.json").write_text('{"a": 1}')
    with pytest.raises(TokenizerError, match="is not an HF tokenizer.json"):
        load_tokenizer(tmp_path)
