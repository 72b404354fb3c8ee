"""The data commands of `megatron-sep`: tokenizer train, preprocess, inspect, demo-corpus, offline-corpus and
corpus-subset (cli.py parses the flags and maps errors to one line)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from megatron_sep.data.separators import resolve_separator_ids
from megatron_sep.data.tokenizer import load_tokenizer

from .corpus import check_inputs
from .demo_corpus import build_demo_corpus
from .inspect_data import inspect
from .offline_corpus import DEFAULT_MANIFEST, build, subset
from .preprocess import preprocess
from .train_tokenizer import train_hf_bpe, train_sentencepiece


def tokenizer_targets(out: str, kind: str) -> list[Path]:
    """The files `tokenizer train` writes: --out is a prefix, as for sentencepiece (an hf-bpe --out
    without .json gets it, so load_tokenizer reads it as tokenizer.json; a folder gets one inside)."""
    if kind == "hf-bpe":
        if Path(out).is_dir():
            return [Path(out) / "tokenizer.json"]
        return [Path(out if out.endswith(".json") else out + ".json")]
    prefix = out[:-6] if out.endswith(".model") else out
    return [Path(prefix + ".model"), Path(prefix + ".vocab")]


def cmd_tokenizer(args) -> int:
    targets = tokenizer_targets(args.out, args.type)
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.force:
        raise ValueError(
            f"{' and '.join(existing)} exist. Fix: choose another --out, or pass --force to replace"
        )
    check_inputs(args.input)
    out = targets[0]
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # innermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    try:  # trained and checked in a scratch folder beside --out, then moved in
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tok-") as tmp:
            size = _train_tokenizer(args, Path(tmp) / out.name)
            for t in targets:
                os.replace(Path(tmp) / t.name, t)
    except BaseException:  # a failure leaves no file, nor the folders it made
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    note = (
        f" (warning: the corpus supports only {size:,} of the {args.vocab_size:,} tokens asked for)"
        if size < args.vocab_size
        else ""
    )
    print(f"wrote {out}: {size:,} tokens{note}")
    return 0


def _train_tokenizer(args, scratch: Path) -> int:
    """Train into `scratch` (hf-bpe: that file; sentencepiece: its .model and .vocab); its size."""
    if args.type == "hf-bpe":
        train_hf_bpe(args.input, scratch, args.vocab_size, args.text_key)
    else:
        train_sentencepiece(
            args.input,
            scratch.with_suffix(""),
            args.vocab_size,
            args.type,
            args.text_key,
            byte_fallback=not args.no_byte_fallback,
            split_separators=not args.no_split_separators,
        )
    return load_tokenizer(scratch).vocab_size


def cmd_preprocess(args) -> int:
    docs, tokens = preprocess(
        args.input,
        args.tokenizer,
        args.out,
        args.text_key,
        args.workers,
        args.txt_docs,
        force=args.force,
    )
    print(f"wrote {args.out}.bin/.idx: {docs:,} documents, {tokens:,} tokens")
    return 0


def cmd_inspect(args) -> int:
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    seps = resolve_separator_ids(tok)[0] if tok else None
    print(inspect(args.prefix, tok, seps, top=args.top))
    return 0


def cmd_demo_corpus(args) -> int:
    out = Path(args.out)
    if out.is_dir():  # --force replaces the corpus file, never a directory (nor the files in it)
        raise ValueError(
            f"--out {out} is a directory; demo-corpus writes one .jsonl file. Fix: pass a file "
            f"path, e.g. --out {out / 'corpus.jsonl'}"
        )
    if out.exists() and not args.force:
        raise ValueError(
            f"{args.out} exists. Fix: choose another --out, or pass --force to replace it"
        )
    docs, nbytes = build_demo_corpus(out)
    print(f"wrote {args.out}: {docs:,} documents, {nbytes / 1e6:.1f} MB of text")
    return 0


def cmd_offline_corpus(args) -> int:
    s = build(
        args.out,
        args.manifest or DEFAULT_MANIFEST,
        args.cache,
        force=args.force,
        progress=not args.no_progress,
    )
    t = s["tokens"]
    print(
        f"corpus in {args.out}: train {t['train'][1]:,} tokens ({t['train'][0]:,} documents), held out "
        f"{t['heldout'][1]:,} tokens ({t['heldout'][0]:,}); tokenizer {args.out}/tokenizer.model. Look at it: "
        f"megatron-sep inspect {args.out}/train_text_document --tokenizer {args.out}/tokenizer.model"
    )
    return 0


def cmd_corpus_subset(args) -> int:
    from megatron_sep.experiments.sweep import parse_tokens  # the sweep's token counts (50M, 1.5B)

    docs, tokens = subset(args.prefix, args.out, parse_tokens(args.tokens), args.seed, args.force)
    print(f"wrote {args.out}.bin/.idx: {docs:,} documents, {tokens:,} tokens of {args.prefix}")
    return 0
