"""Tokenize documents into a Megatron `.bin/.idx` pair, EOD appended to each document."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

from tqdm import tqdm

from megatron_sep.data.indexed import IndexedDatasetWriter, dtype_for_vocab, paths
from megatron_sep.data.tokenizer import load_tokenizer

from .corpus import check_inputs, iter_documents

_TOK = None


def _init(tokenizer_path):
    global _TOK
    _TOK = load_tokenizer(tokenizer_path)


def _encode(text):
    ids = _TOK.encode(text)
    ids.append(_TOK.eod_id)
    return ids


def preprocess(
    files,
    tokenizer_path,
    out_prefix,
    text_key="text",
    workers=None,
    txt_docs="blank",
    progress=True,
    force=False,
):
    """Returns (documents, tokens) written. Writes to temporary names, renamed when complete; a failure or
    Ctrl-C removes the temporaries. Existing outputs are replaced only with force."""
    check_inputs(files)
    tok = load_tokenizer(tokenizer_path)
    dtype = dtype_for_vocab(tok.vocab_size)
    bin_path, idx_path = paths(out_prefix)
    existing = [str(p) for p in (bin_path, idx_path) if p.exists()]
    if existing and not force:
        raise ValueError(
            f"{' and '.join(existing)} exist. Fix: choose another --out, or pass --force to "
            "replace them"
        )
    tmp_prefix = Path(str(bin_path.with_suffix("")) + ".tmp")
    tmp_bin, tmp_idx = paths(tmp_prefix)
    workers = workers or max(1, (os.cpu_count() or 1))
    try:
        n_docs, n_tokens = _write(
            files, tokenizer_path, tmp_prefix, dtype, text_key, workers, txt_docs, progress
        )
        if n_docs == 0:
            raise ValueError(
                f"no documents found in {files}. Fix: check the input files and --text-key"
            )
    except BaseException:
        for p in (tmp_bin, tmp_idx):
            p.unlink(missing_ok=True)
        raise
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_idx, idx_path)
    return n_docs, n_tokens


def _write(files, tokenizer_path, tmp_prefix, dtype, text_key, workers, txt_docs, progress):
    docs = iter_documents(files, text_key, txt_docs)
    n_docs = n_tokens = 0
    bar = tqdm(desc="preprocess", unit=" docs", disable=not progress, mininterval=1.0)
    # the bar ends its line before any error
    with bar, IndexedDatasetWriter(tmp_prefix, dtype) as writer:
        if workers > 1:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init, initargs=(str(tokenizer_path),)) as pool:
                for ids in pool.imap(_encode, docs, chunksize=32):
                    writer.add_document(ids)
                    n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
                    bar.update(1)
                    bar.set_postfix(tokens=n_tokens, refresh=False)
        else:
            _init(tokenizer_path)
            for text in docs:
                ids = _encode(text)
                writer.add_document(ids)
                n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
                bar.update(1)
    return n_docs, n_tokens
