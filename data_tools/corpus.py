"""Read documents from .jsonl (a text key) or plain text files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def iter_documents(files: list[str], text_key: str = "text", txt_docs: str = "blank") -> Iterator[str]:
    """Yield documents. Plain text splits into documents per blank line, per line, or per file."""
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} not found. Fix: pass existing .jsonl or .txt files")
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}). Fix: one JSON object "
                                         "per line") from None
                    if text_key not in record:
                        raise ValueError(f"{path}:{n} has no key {text_key!r} (keys: {sorted(record)}). "
                                         "Fix: pass --text-key with the right name")
                    yield record[text_key]
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if txt_docs == "file":
                yield text
            elif txt_docs == "line":
                yield from (line for line in text.splitlines() if line.strip())
            else:
                yield from (d.strip("\n") for d in text.split("\n\n") if d.strip())
