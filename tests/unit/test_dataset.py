import numpy as np

from megatron_sep.data.dataset import (
    BlendedDataset,
    PackedDataset,
    blend_index,
    build_datasets,
    split_ranges,
)
from megatron_sep.data.indexed import IndexedDataset, IndexedDatasetWriter


def make(prefix, docs):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return IndexedDataset(prefix)


def test_packing_covers_the_shuffled_stream(tmp_path):
    rng = np.random.default_rng()
    docs = [rng.integers(0, 1000, size=rng.integers(1, 40)) for _ in range(60)]
    ix = make(tmp_path / "a", docs)
    seq = 16
    ds = PackedDataset(ix, (0, len(docs)), seq, None, seed=5)
    stream = np.concatenate([docs[i] for i in ds.doc_order])
    assert ds.epochs == 1 and len(ds) == (len(stream) - 1) // seq
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s.shape == (seq + 1,)
        j = int(ds.shuffle[i])
        np.testing.assert_array_equal(s, stream[j * seq : j * seq + seq + 1])
        seen.add(j)
    assert seen == set(range(len(ds)))  # every sample exactly once


def test_shuffle_is_seeded(tmp_path):
    docs = [np.arange(i, i + 20) for i in range(50)]
    ix = make(tmp_path / "a", docs)
    a = PackedDataset(ix, (0, 50), 8, None, seed=1)
    b = PackedDataset(ix, (0, 50), 8, None, seed=1)
    c = PackedDataset(ix, (0, 50), 8, None, seed=2)
    assert all((a[i] == b[i]).all() for i in range(len(a)))
    assert any((a[i] != c[i]).any() for i in range(len(a)))


def test_multiple_epochs_when_more_samples_wanted(tmp_path):
    ix = make(tmp_path / "a", [np.arange(10) for _ in range(10)])
    ds = PackedDataset(ix, (0, 10), 9, 40, seed=0)
    assert len(ds) == 40 and ds.epochs >= 4
    assert all(ds[i].shape == (10,) for i in range(40))


def test_splits_are_disjoint_and_cover():
    r = split_ranges(1000, [0.9, 0.05, 0.05])
    assert r[0][0] == 0 and r[0][1] == r[1][0] and r[1][1] == r[2][0] and r[2][1] == 1000
    assert r[0] == (0, 900)


def test_blend_follows_weights():
    which, within = blend_index([0.7, 0.2, 0.1], 1000)
    counts = np.bincount(which, minlength=3)
    np.testing.assert_allclose(counts / 1000, [0.7, 0.2, 0.1], atol=2e-3)
    for k in range(3):  # each source is read in order, without gaps
        np.testing.assert_array_equal(within[which == k], np.arange(counts[k]))


def test_blended_dataset_draws_from_each_source(tmp_path):
    make(tmp_path / "a", [np.full(30, 1) for _ in range(20)])
    make(tmp_path / "b", [np.full(30, 2) for _ in range(20)])
    train, valid, test = build_datasets(
        [str(tmp_path / "a"), str(tmp_path / "b")], [3.0, 1.0], [0.8, 0.2, 0.0], 8, 0, (400, 20, 0)
    )
    assert isinstance(train, BlendedDataset) and test is None and len(train) == 400
    firsts = np.array([train[i][0] for i in range(400)])
    assert abs((firsts == 1).mean() - 0.75) < 0.01
    assert len(valid) == 20


def test_resume_replays_identical_batches(tmp_path):
    rng = np.random.default_rng()
    ix = make(tmp_path / "a", [rng.integers(0, 100, size=25) for _ in range(40)])
    full = PackedDataset(ix, (0, 40), 12, 60, seed=3)
    order = [full[i] for i in range(60)]
    rebuilt = PackedDataset(IndexedDataset(tmp_path / "a"), (0, 40), 12, 60, seed=3)
    consumed = 24
    for i in range(consumed, 60):
        np.testing.assert_array_equal(rebuilt[i], order[i])
