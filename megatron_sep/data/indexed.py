"""Megatron-LM / GPT-NeoX memory-mapped indexed datasets (`prefix.bin` + `prefix.idx`).

`.idx` layout (little endian), the same as Megatron's MMapIndexedDataset:
  9-byte magic b"MMIDIDX\\x00\\x00", u64 version (1), u8 dtype code,
  u64 sequence count N, u64 document-index length D,
  int32 sizes[N], int64 pointers[N] (byte offsets into .bin), int64 doc_idx[D].
`.bin` is the token ids back to back. Files written by Megatron-LM or GPT-NeoX
load unchanged, and files written here load there.

A document is a `doc_idx` range of sequences: Megatron's `--split-sentences` writes
one sequence per sentence and closes each document in `doc_idx`. Files written here
hold one sequence per document. Documents are what the packer shuffles and splits.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_HEADER = len(MAGIC) + 8 + 1 + 8 + 8


class IndexedDataError(ValueError):
    pass


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (as Megatron does), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDatasetWriter:
    """Appends documents to `prefix.bin` and writes `prefix.idx` on close."""

    def __init__(self, prefix: str | Path, dtype):
        self.bin_path, self.idx_path = paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise IndexedDataError(f"dtype {self.dtype} has no Megatron code; use uint16 or int32")
        self._bin = open(self.bin_path, "wb")
        self.sizes: list[int] = []

    def add_document(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self.sizes.append(arr.size)

    def close(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        write_index(self.idx_path, self.dtype, np.asarray(self.sizes, dtype=np.int32))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_index(idx_path: Path, dtype, sizes: np.ndarray, doc_idx: np.ndarray | None = None) -> None:
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    if doc_idx is None:  # one sequence per document
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(doc_idx, dtype=np.int64).tobytes(order="C"))


class IndexedDataset:
    """Read-only view of a `.bin/.idx` pair; `ds[i]` is document i's token array (a memmap view)."""

    def __init__(self, prefix: str | Path):
        self.bin_path, self.idx_path = paths(prefix)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise IndexedDataError(
                    f"data file {p} not found. Fix: run `megatron-sep preprocess` to create "
                    f"{p.with_suffix('')}.bin/.idx, or correct data.paths")
        self._read_index()
        expected = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if len(self.sizes) else 0
        actual = self.bin_path.stat().st_size
        if actual != expected:
            raise IndexedDataError(
                f"{self.bin_path} holds {actual} bytes but {self.idx_path} describes {expected} bytes: "
                f"the .bin is {'truncated' if actual < expected else 'longer than its index'} or the "
                "pair does not belong together. Fix: re-run `megatron-sep preprocess` for this prefix")
        self.tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if actual
                       else np.zeros(0, dtype=self.dtype))

    def _read_index(self) -> None:
        size = self.idx_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            head = f.read(_HEADER)
        bad = f"{self.idx_path} is not a Megatron index file"
        fix = "Fix: re-run `megatron-sep preprocess` for this prefix"
        if len(head) < _HEADER or head[: len(MAGIC)] != MAGIC:
            raise IndexedDataError(f"{bad} (bad magic header). {fix}")
        version, = struct.unpack("<Q", head[9:17])
        code = head[17]
        count, doc_count = struct.unpack("<QQ", head[18:34])
        if version != VERSION:
            raise IndexedDataError(f"{bad} (version {version}, expected {VERSION}). {fix}")
        if code not in DTYPES:
            raise IndexedDataError(f"{bad} (unknown dtype code {code}). {fix}")
        if size != _HEADER + count * 12 + doc_count * 8:
            raise IndexedDataError(f"{self.idx_path} is truncated or corrupt "
                                   f"(size {size} does not match its {count} sequences). {fix}")
        self.dtype = np.dtype(DTYPES[code])
        buf = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        off = _HEADER
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=count, offset=off)
        off += count * 4
        self.pointers = np.frombuffer(buf, dtype=np.int64, count=count, offset=off)
        off += count * 8
        self.doc_idx = np.frombuffer(buf, dtype=np.int64, count=doc_count, offset=off)
        self._documents(fix)

    def _documents(self, fix: str) -> None:
        """Per-document token counts and starts; a document's sequences lie back to back in the .bin."""
        d, n = self.doc_idx, len(self.sizes)
        if len(d) == 0 or d[0] != 0 or d[-1] != n or np.any(np.diff(d) < 0):
            raise IndexedDataError(f"{self.idx_path} has a corrupt document index (doc_idx must rise from 0 "
                                   f"to its {n} sequences). {fix}")
        item = self.dtype.itemsize
        if n > 1 and np.any(self.pointers[1:] != self.pointers[:-1] + self.sizes[:-1].astype(np.int64) * item):
            raise IndexedDataError(f"{self.idx_path}: its sequences are not stored back to back in the .bin, "
                                   f"which documents need here. {fix}")
        cum = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        self.doc_sizes = cum[d[1:]] - cum[d[:-1]]  # tokens per document
        self.doc_starts = cum[d[:-1]]  # first token of each document in the .bin

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start: start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i, cut at its end as a slice is (never the next one's)."""
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sizes[i]) - offset
        n = max(0, n if length is None else min(length, n))
        return self.tokens[start: start + n]

    @property
    def num_docs(self) -> int:
        return len(self.doc_idx) - 1

    def get_doc(self, d: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document d (all its sequences, in order)."""
        n = int(self.doc_sizes[d]) - offset if length is None else length
        start = int(self.doc_starts[d]) + offset
        return self.tokens[start: start + n]

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))
