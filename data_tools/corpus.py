"""Read documents from .jsonl (a text key) or plain text files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

SAMPLE = 1 << 16  # bytes looked at to tell text from binary


def check_text(path: Path) -> None:
    """Refuse a file that is mostly not text (a binary given by mistake would be tokenized silently)."""
    with open(path, "rb") as f:
        sample = f.read(SAMPLE)
    text = sample.decode("utf-8", errors="replace")
    odd = sum(ch == "\ufffd" or (ord(ch) < 32 and ch not in "\n\r\t\f") for ch in text)
    if b"\0" in sample or (text and odd / len(text) > 0.1):
        raise ValueError(
            f"{path} does not look like text ({odd} of the first {len(text)} characters are "
            "binary or not UTF-8). Fix: pass .jsonl or UTF-8 .txt files"
        )


def check_inputs(files: list[str]) -> None:
    """Every input exists and is a file, before a command creates anything."""
    for name in files:
        if not Path(name).is_file():
            raise FileNotFoundError(
                f"input file {name} not found. Fix: pass existing .jsonl or .txt files"
            )


def iter_documents(
    files: list[str], text_key: str = "text", txt_docs: str = "blank"
) -> Iterator[str]:
    """Yield documents. Plain text splits into documents per blank line, per line, or per file."""
    check_inputs(files)
    for name in files:
        path = Path(name)
        check_text(path)
        if path.suffix in (".jsonl", ".json"):
            yield from _jsonl(path, text_key)
        else:  # a stray invalid byte becomes U+FFFD; mostly-binary files were refused above
            text = path.read_text(encoding="utf-8", errors="replace")
            if txt_docs == "file":
                yield text
            elif txt_docs == "line":
                yield from (line for line in text.splitlines() if line.strip())
            else:
                yield from (d.strip("\n") for d in text.split("\n\n") if d.strip())


def _jsonl(path: Path, text_key: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{n} is not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}). "
                    "Fix: convert the file to UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{n} is not valid JSON ({e.msg}). Fix: one JSON object per line"
                ) from None
            if not isinstance(record, dict) or text_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{n} has no key {text_key!r} (found: {keys}). Fix: pass --text-key "
                    "with the right name"
                )
            if not isinstance(record[text_key], str):
                raise ValueError(
                    f"{path}:{n} has a {type(record[text_key]).__name__} under {text_key!r}, not text. "
                    "Fix: make every document's text a string"
                )
            yield record[text_key]
