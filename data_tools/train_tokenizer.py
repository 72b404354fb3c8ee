"""Train a sentencepiece (BPE / unigram) or HF byte-level BPE tokenizer on a corpus."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .corpus import check_inputs, iter_documents

EOD, PAD = "<|endoftext|>", "<pad>"
# Separator strings kept as single tokens so SepLLM can find them.
SEPARATORS = [".", ",", "?", "!", ";", ":", "\n", "\t"]


def train_sentencepiece(
    files,
    out_prefix,
    vocab_size,
    model_type="bpe",
    text_key="text",
    byte_fallback=True,
    split_separators=True,
    max_sentences=2_000_000,
    extra_symbols=(),
    threads=None,
):
    import sentencepiece as spm

    check_inputs(files)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    symbols = list(extra_symbols) + (SEPARATORS if split_separators else ["\n", "\t"])
    with tempfile.TemporaryDirectory() as tmp:
        lines = os.path.join(tmp, "input.txt")
        with open(lines, "w", encoding="utf-8") as f:
            for doc in iter_documents(files, text_key):
                for line in doc.splitlines():
                    if line.strip():
                        f.write(line + "\n")
        try:
            spm.SentencePieceTrainer.train(
                input=lines,
                model_prefix=str(out_prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=byte_fallback,
                pad_id=0,
                unk_id=1,
                bos_id=-1,
                eos_id=2,
                pad_piece=PAD,
                eos_piece=EOD,
                user_defined_symbols=symbols,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                num_threads=threads or os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:  # sentencepiece reports bad settings as RuntimeError
            raise ValueError(
                f"sentencepiece training failed: {e}. Fix: adjust --vocab-size (byte fallback "
                "alone needs 256 + special pieces) or the input"
            ) from None
    return Path(str(out_prefix) + ".model")


def train_hf_bpe(files, out_path, vocab_size, text_key="text", extra_symbols=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD, PAD, *extra_symbols],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_documents(files, text_key), trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return out_path
