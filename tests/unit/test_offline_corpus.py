"""The offline corpus build on a small manifest of packages made here (a wheel and a .deb in the cache, so
nothing is downloaded): two builds are byte-identical, the filters hold, the held-out split is by file, an
interrupted build resumes to the same bytes, and foreign folders or wrong hashes are refused."""

import gzip
import hashlib
import io
import json
import random
import tarfile
import zipfile

import pytest

from data_tools import offline_corpus as oc
from data_tools.offline_sources import (
    ManifestError,
    check_hash,
    documents,
    html_to_text,
    strip_license_header,
)
from megatron_sep.data.indexed import IndexedDataset

WORDS = (
    "the model reads a token and writes the next one while separators mark where a segment ends "
    "attention keeps the first tokens every separator and a window of neighbours"
).split()


def prose(rng, n_sentences):
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ",", ";", "?", "!"]))
    return " ".join(out)


def code(rng, i):
    body = "\n".join(
        f"    x{j} = compute({rng.randint(0, 99)}, '{rng.choice(WORDS)}')  # {rng.choice(WORDS)}"
        for j in range(rng.randint(8, 20))
    )
    return f"# Copyright 2024 Someone. Licensed under the Apache License.\n# See LICENSE.\n\ndef f{i}():\n{body}\n"


def make_wheel(path, rng):
    with zipfile.ZipFile(path, "w") as z:
        for i in range(30):
            z.writestr(f"pkg/mod{i:02d}.py", code(rng, i))
        z.writestr("pkg/dup.py", code(random.Random(7), 99))
        z.writestr("pkg/dup_again.py", code(random.Random(7), 99))  # an exact duplicate: dropped
        z.writestr("pkg-1.0.dist-info/LICENSE", "Permission is hereby granted " * 20)
        z.writestr("pkg/data.bin", bytes(range(256)) * 4)
        z.writestr("pkg/min.js", "var a=1;" * 400)


def make_deb(path, rng):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:

        def add(name, raw):
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))

        for i in range(20):
            add(
                f"./usr/share/doc/tool/html/page{i:02d}.html",
                f"<html><head><title>t</title><script>var x = 1;</script></head><body><h1>Page {i}</h1>"
                f"<p>{prose(rng, 12)}</p><pre>  keep   spacing</pre></body></html>".encode(),
            )
        add("./usr/share/doc/tool/copyright", b"Copyright notice " * 40)
        add("./usr/share/doc/tool/html/page00.html.fr", ("<p>" + prose(rng, 10) + "</p>").encode())
        add(
            "./usr/share/man/man1/tool.1.gz",
            gzip.compress(
                (
                    ".TH TOOL 1\n.SH NAME\ntool \\- does things\n.SH DESCRIPTION\n"
                    + prose(rng, 10)
                    + "\n"
                ).encode(),
                mtime=0,
            ),
        )
        add(
            "./usr/share/doc/tool/big.txt", "\n\n".join(prose(rng, 30) for _ in range(150)).encode()
        )
    body = data.getvalue()
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.xz", b""), (b"data.tar.xz", body)]
    raw = b"!<arch>\n"
    for name, blob in members:
        raw += (
            name.ljust(16)
            + b"0".ljust(12)
            + b"0".ljust(6)
            + b"0".ljust(6)
            + b"100644".ljust(8)
            + str(len(blob)).encode().ljust(10)
            + b"`\n"
            + blob
            + (b"\n" if len(blob) % 2 else b"")
        )
    path.write_bytes(raw)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    cache = root / "cache"
    cache.mkdir()
    rng = random.Random(0)
    make_wheel(cache / "pkg-1.0-py3-none-any.whl", rng)
    make_deb(cache / "tool-doc_1.0_all.deb", rng)
    pkgs = [
        {"source": "pypi", "name": "pkg", "version": "1.0", "file": "pkg-1.0-py3-none-any.whl"},
        {"source": "debian", "name": "tool-doc", "version": "1.0", "file": "tool-doc_1.0_all.deb"},
    ]
    for p in pkgs:
        p["sha256"] = hashlib.sha256((cache / p["file"]).read_bytes()).hexdigest()
    manifest = root / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "name": "small",
                "heldout_fraction": 0.2,
                "packages": pkgs,
                "tokenizer": {"vocab_size": 400, "sample_bytes": 100_000},
            }
        )
    )
    a = oc.build(root / "a", manifest, cache, progress=False, echo=lambda *_: None)
    return root, cache, manifest, a


def files_of(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "downloads" not in p.parts and p.name != oc.STAMP
    }


def test_two_builds_are_byte_identical_and_an_interrupted_one_resumes(small):
    root, cache, manifest, first = small
    b = root / "b"
    oc.build(b, manifest, cache, progress=False, echo=lambda *_: None)
    assert files_of(root / "a") == files_of(b)
    # interrupted after extracting the first package: the stamp lists no stage, one part is written
    c = root / "c"
    s = oc.check_out(c, oc.load_manifest(manifest), False)
    oc._save_stamp(c, s)
    (c / "parts").mkdir()
    (c / "parts" / "000-pkg.jsonl").write_bytes(
        (root / "a" / "parts" / "000-pkg.jsonl").read_bytes()
    )
    # a kill mid-write leaves only a .tmp
    (c / "parts" / "001-tool-doc.jsonl.tmp").write_text("half a line")
    oc.build(c, manifest, cache, progress=False, echo=lambda *_: None)
    assert {k: v for k, v in files_of(c).items() if not k.endswith(".tmp")} == files_of(root / "a")
    assert first["tokens"]["train"][1] > 0 and first["tokens"]["heldout"][1] > 0


def test_filters_and_the_split(small):
    root = small[0] / "a"
    parts = [json.loads(line) for f in sorted((root / "parts").glob("*.jsonl")) for line in open(f)]
    paths = {r["path"] for r in parts}
    assert not any(
        "LICENSE" in p or p.endswith(("copyright", ".bin", ".fr", "min.js")) for p in paths
    )
    assert "usr/share/man/man1/tool.1.gz" in paths
    texts = [r["text"] for r in parts]
    assert not any("Licensed under" in t or "<p>" in t or "var x" in t or ".SH" in t for t in texts)
    big = [r for r in parts if r["path"].endswith("big.txt")]
    assert len(big) > 1 and all(len(r["text"].encode()) <= 256_000 for r in big)  # cut into parts
    train = [json.loads(line)["text"] for line in open(root / "train.jsonl")]
    held = [json.loads(line)["text"] for line in open(root / "heldout.jsonl")]
    # no duplicates, no document on both sides
    assert len(set(train) | set(held)) == len(train) + len(held)
    assert len(train) + len(held) == len(parts) - 1  # dup.py's copy went
    side = {}  # every part of a file on one side
    for r in parts:
        side.setdefault(r["path"], set()).add(r["text"] in set(held))
    assert all(len(v) == 1 for v in side.values())
    ds = IndexedDataset(root / "train_text_document")
    assert ds.num_docs == len(train)
    mix = oc.source_mix(str(root / "train_text_document"), ds.doc_sizes)
    assert "code" in mix[0] and any("debian:tool-doc" in line for line in mix)


def test_refusals(small, tmp_path):
    root, cache, manifest, _ = small
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("a user's file")
    with pytest.raises(ManifestError, match="not empty"):
        oc.build(foreign, manifest, cache, progress=False)
    assert (foreign / "mine.txt").read_text() == "a user's file"
    other = json.loads(manifest.read_text())
    other["heldout_fraction"] = 0.3
    m2 = tmp_path / "m2.json"
    m2.write_text(json.dumps(other))
    with pytest.raises(ManifestError, match="another manifest"):
        oc.build(root / "a", m2, cache, progress=False)
    bad = json.loads(manifest.read_text())
    bad["packages"][1]["sha256"] = "0" * 64
    # what every download is checked with
    with pytest.raises(ManifestError, match="not the pinned file"):
        check_hash(cache / bad["packages"][1]["file"], bad["packages"][1])
    # apt-get answers from its lists: no network
    unknown = dict(bad["packages"][1], name="no-such-package-here")
    with pytest.raises(ManifestError, match="no-such-package-here"):
        oc.fetch(unknown, tmp_path / "empty_cache")
    m3 = tmp_path / "m3.json"
    for text, why in [
        ("[1]", "non-empty"),
        ("{", "not valid JSON"),
        (json.dumps({"packages": [{"source": "ftp"}]}), "exactly the keys"),
    ]:
        m3.write_text(text)
        with pytest.raises(ManifestError, match=why):
            oc.load_manifest(m3)


def test_text_helpers():
    assert html_to_text("<p>a&amp;b</p><script>x()</script><pre>  two  spaces</pre>").split(
        "\n"
    ) == ["", "a&b", "", "  two  spaces", ""]
    src = "#!/usr/bin/env python\n# Copyright 2020 X\n# MIT License\n\nimport os\n" + "x = 1\n" * 50
    out = strip_license_header(src)
    assert "Copyright" not in out and out.startswith("#!/usr/bin/env python") and "import os" in out
    kept = "# compute the sum\n" + "x = 1\n" * 50
    assert strip_license_header(kept) == kept
    assert list(documents("pkg/LICENSE.txt", b"x" * 500)) == []
    assert list(documents("usr/share/man/de/man1/ls.1", b"x " * 300)) == []  # a translation


def test_a_block_without_blank_lines_is_cut_at_line_ends():
    from data_tools.offline_sources import MAX_DOC, split_large

    rng = random.Random(1)
    # a dictionary: no blank line
    text = "\n".join(f"entry{i} {'x' * rng.randint(1, 120)}" for i in range(12_000))
    parts = split_large(text)
    assert len(parts) > 1 and all(len(p.encode()) <= MAX_DOC for p in parts)
    assert "\n".join(parts) == text


def test_subset_takes_whole_documents_in_corpus_order(small, tmp_path):
    import numpy as np

    prefix = str(small[0] / "a" / "train_text_document")
    src = IndexedDataset(prefix)
    want = int(src.doc_sizes.sum()) // 3
    docs, tokens = oc.subset(prefix, str(tmp_path / "s"), want, seed=3)
    sub = IndexedDataset(tmp_path / "s")
    assert sub.num_docs == docs < src.num_docs and tokens == int(sub.doc_sizes.sum()) >= want
    originals = {tuple(src.get_doc(d)): d for d in range(src.num_docs)}
    picked = [originals[tuple(sub.get_doc(d))] for d in range(sub.num_docs)]  # every document whole
    assert picked == sorted(picked)
    meta = json.loads((tmp_path / "s.sources.json").read_text())
    full = json.loads(open(prefix + ".sources.json").read())
    assert meta["doc_source"] == [full["doc_source"][d] for d in picked]
    oc.subset(prefix, str(tmp_path / "t"), want, seed=3)
    assert (tmp_path / "t.bin").read_bytes() == (
        tmp_path / "s.bin"
    ).read_bytes()  # the seed decides
    assert np.array_equal(IndexedDataset(tmp_path / "t").doc_sizes, sub.doc_sizes)
    with pytest.raises(ValueError, match="exists"):
        oc.subset(prefix, str(tmp_path / "s"), want)
    with pytest.raises(ValueError, match="the corpus itself"):
        oc.subset(prefix, prefix, want, force=True)
