import struct

import numpy as np
import pytest

from megatron_sep.data.indexed import (
    IndexedDataError,
    IndexedDataset,
    IndexedDatasetWriter,
    dtype_for_vocab,
)


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)


def random_docs(rng, n=50, vocab=60000):
    return [rng.integers(0, vocab, size=rng.integers(1, 300)) for _ in range(n)]


def test_round_trip(tmp_path):
    rng = np.random.default_rng()
    docs = random_docs(rng)
    write(tmp_path / "a", docs)
    ds = IndexedDataset(tmp_path / "a")
    assert len(ds) == len(docs) and ds.dtype == np.uint16
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    assert ds.num_tokens == sum(len(d) for d in docs)
    np.testing.assert_array_equal(ds.get(3, 1, 2), docs[3][1:3])


def test_megatron_layout_read_independently(tmp_path):
    """Parse the .idx with struct, per Megatron's MMapIndexedDataset spec, not with our reader."""
    docs = [np.array([1, 2, 3]), np.array([70000, 5])]
    write(tmp_path / "b", docs, np.int32)
    raw = (tmp_path / "b.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, ndoc = struct.unpack("<QBQQ", raw[9:34])
    assert (version, code, n, ndoc) == (1, 4, 2, 3)
    sizes = struct.unpack("<2i", raw[34:42])
    pointers = struct.unpack("<2q", raw[42:58])
    doc_idx = struct.unpack("<3q", raw[58:82])
    assert sizes == (3, 2) and pointers == (0, 12) and doc_idx == (0, 1, 2) and len(raw) == 82
    assert np.frombuffer((tmp_path / "b.bin").read_bytes(), np.int32).tolist() == [
        1,
        2,
        3,
        70000,
        5,
    ]


def test_dtype_by_vocab():
    assert dtype_for_vocab(50304) == np.uint16 and dtype_for_vocab(128256) == np.int32


def test_truncated_bin_rejected(tmp_path):
    write(tmp_path / "c", random_docs(np.random.default_rng()))
    data = (tmp_path / "c.bin").read_bytes()
    (tmp_path / "c.bin").write_bytes(data[:-10])
    with pytest.raises(IndexedDataError, match="truncated.*preprocess"):
        IndexedDataset(tmp_path / "c")


def test_mismatched_idx_rejected(tmp_path):
    rng = np.random.default_rng()
    write(tmp_path / "d", random_docs(rng, n=20))
    write(tmp_path / "e", random_docs(rng, n=30))
    (tmp_path / "d.idx").write_bytes((tmp_path / "e.idx").read_bytes())
    with pytest.raises(IndexedDataError, match="does not belong together|truncated|longer"):
        IndexedDataset(tmp_path / "d")


def test_corrupt_idx_rejected(tmp_path):
    write(tmp_path / "f", random_docs(np.random.default_rng(), n=5))
    raw = bytearray((tmp_path / "f.idx").read_bytes())
    (tmp_path / "f.idx").write_bytes(bytes(raw[:-4]))
    with pytest.raises(IndexedDataError, match="truncated or corrupt"):
        IndexedDataset(tmp_path / "f")
    raw[0:4] = b"JUNK"
    (tmp_path / "f.idx").write_bytes(bytes(raw))
    with pytest.raises(IndexedDataError, match="bad magic"):
        IndexedDataset(tmp_path / "f")


def test_missing_file_rejected(tmp_path):
    write(tmp_path / "g", [np.array([1, 2])])
    (tmp_path / "g.bin").unlink()
    with pytest.raises(IndexedDataError, match="g.bin not found.*preprocess"):
        IndexedDataset(tmp_path / "g")
    with pytest.raises(IndexedDataError, match="not found"):
        IndexedDataset(tmp_path / "nothing")
