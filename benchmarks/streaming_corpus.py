"""The corpus behind the streaming benchmark: text documents split into a training set and a held-out stream.

Inputs are .jsonl files ({"text": ...} per line) and directories of text files (.rst, .txt, .md, .adoc: one
document per file). Documents are shuffled with a fixed seed; the first ones, up to --heldout-chars characters,
form heldout.jsonl (the stream `megatron-sep eval --text` reads), the rest train.jsonl. The split is by
document, so the model never trains on a word of the stream.

    PYTHONPATH=. python3 benchmarks/streaming_corpus.py --out data/stream data/demo/corpus.jsonl ~/peps ~/git/Documentation
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from megatron_sep.outdir import prepare_out

SUFFIXES = {".rst", ".txt", ".md", ".adoc"}


def documents(source: Path, min_chars: int):
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if len(text) >= min_chars:
                yield text
    else:
        with open(source, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    text = json.loads(line)["text"]
                    if len(text) >= min_chars:
                        yield text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--heldout-chars", type=int, default=5_500_000, help="~1.2M tokens at an 8K vocabulary"
    )
    p.add_argument("--min-chars", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--force", action="store_true", help="replace this script's two files in a non-empty --out"
    )
    args = p.parse_args()
    try:
        return split(args)
    except (OSError, ValueError) as e:  # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError:
        print('error: a .jsonl source has a line without a "text" field', file=sys.stderr)
        return 2


def split(args) -> int:
    docs = [d for s in args.sources for d in documents(s, args.min_chars)]
    random.Random(args.seed).shuffle(docs)
    prepare_out(
        args.out,
        args.force,
        ("heldout.jsonl", "train.jsonl"),
        "replace heldout.jsonl and train.jsonl",
    )
    held = 0
    with (
        open(args.out / "heldout.jsonl", "w", encoding="utf-8") as h,
        open(args.out / "train.jsonl", "w", encoding="utf-8") as t,
    ):
        for d in docs:
            dest = h if held < args.heldout_chars else t
            held += len(d) if dest is h else 0
            dest.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    total = sum(map(len, docs))
    print(
        f"{len(docs)} documents, {total / 1e6:.1f}M characters: held out {held / 1e6:.2f}M, "
        f"train {(total - held) / 1e6:.2f}M -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
