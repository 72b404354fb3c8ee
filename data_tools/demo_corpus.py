"""Build the demo corpus from prose every install already has.

Sources, in this order: the Python standard library's documentation topics
(`pydoc_data`) and its docstrings, then the docstrings of installed torch and
numpy. Doctest examples, RST directives and symbol-heavy lines are dropped;
each docstring or topic becomes one document. No download is needed: the demo
depends on torch anyway, and CI pins its version, so the corpus is reproducible.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import sysconfig
import tempfile
from pathlib import Path

from tqdm import tqdm

_CODE = re.compile(r"^\s*(>>>|\.\.\.|\.\. |:\w+:|[-=~^*]{3,}\s*$|\$ )")


def _clean(text: str) -> str:
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if _CODE.match(line) or (s and sum(c.isalpha() or c == " " for c in s) / len(s) < 0.7):
            keep.append("")
            continue
        keep.append(s)
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(keep)).strip()
    return out


def _python_files(root: Path, skip=("site-packages", "test", "tests", "idlelib", "lib2to3")):
    for dp, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("_vendor"))
        for f in sorted(files):
            if f.endswith(".py"):
                yield Path(dp) / f


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _roots():
    yield Path(sysconfig.get_paths()["stdlib"])
    for name in ("torch", "numpy"):
        spec = importlib.util.find_spec(name)
        if spec and spec.origin:
            yield Path(spec.origin).parent


def build_demo_corpus(
    out: str | Path, min_chars: int = 200, progress: bool = True
) -> tuple[int, int]:
    """Write a jsonl corpus; returns (documents, bytes). It is written to a temporary file of its own (never
    a name a user's file may have) and renamed over `out`; on any failure the temporary file is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    docs = nbytes = 0
    try:
        with open(fd, "w", encoding="utf-8") as f:

            def emit(text):
                nonlocal docs, nbytes
                text = _clean(text)
                if len(text) >= min_chars:
                    line = json.dumps({"text": text}, ensure_ascii=False)
                    f.write(line + "\n")
                    docs, nbytes = docs + 1, nbytes + len(text.encode())

            try:
                from pydoc_data.topics import topics

                for key in sorted(topics):
                    emit(topics[key])
            except ImportError:
                pass
            files = [p for root in _roots() for p in _python_files(root)]
            for path in tqdm(
                files, desc="demo corpus", unit=" files", disable=not progress, mininterval=1.0
            ):
                for doc in _docstrings(path):
                    emit(doc)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the corpus is an ordinary file
        os.replace(tmp, out)
    except BaseException:  # Ctrl-C included: leave nothing behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return docs, nbytes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
