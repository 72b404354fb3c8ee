"""The tokenizer files of an export, so `AutoTokenizer.from_pretrained(dir)` gives the project's ids.

A sentencepiece model becomes a `tokenizer.json` built from its own pieces and settings:
- the normalizer does what sentencepiece does to the whole text (its charsmap, then the dummy
  prefix "▁" and spaces to "▁");
- user-defined symbols (the separators) are cut out by the pre-tokenizer, as sentencepiece matches
  them before segmenting;
- BPE merges come from the piece scores (a merge ranks as the score of the piece it makes);
  unigram keeps the scores as they are; both fall back to bytes.
Special pieces (pad, eos, unk, bos) are added tokens; typed in text they stay text, as in sentencepiece
(`split_special_tokens`), except that a unigram model's trie still holds them whole. An HF
`tokenizer.json` is copied as it is (typed special tokens are special there, in the project too). Both
get a `tokenizer_config.json` naming the generic fast class, so transformers applies no
model-specific tokenizer (GPT-NeoX's or Llama's) on top.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..data.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
SPACE = "\u2581"


def _fields(buf: bytes):
    """(field number, value) of one protobuf message: ints for varints, bytes for length-delimited,
    floats for 32-bit. The few fields read here do not justify a protobuf runtime, whose major version
    must match the one sentencepiece generated its model code with."""
    import struct

    i = 0

    def varint():
        nonlocal i
        shift = out = 0
        while True:
            byte = buf[i]
            i += 1
            out |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return out

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        size = {0: 0, 1: 8, 2: None, 5: 4}.get(wire, -1)
        if size == -1:
            raise ValueError(f"protobuf wire type {wire} is not expected in a sentencepiece model")
        if wire == 0:
            yield field, varint()
            continue
        if size is None:
            size = varint()
        if i + size > len(buf):
            raise ValueError("the file ends inside a field")
        if wire == 2:
            yield field, buf[i : i + size]
        elif wire == 5:
            yield field, struct.unpack("<f", buf[i : i + 4])[0]
        i += size


def read_sentencepiece(path: str | Path) -> dict:
    """Pieces (piece, score, type) and the settings that decide segmentation, with proto2 defaults."""
    spec = {
        "pieces": [],
        "model_type": UNIGRAM,
        "byte_fallback": False,
        "suffix_whitespace": False,
        "charsmap": b"",
        "dummy_prefix": True,
        "strip_spaces": True,
        "escape_spaces": True,
    }
    seen_trainer = False
    try:
        for field, value in _fields(Path(path).read_bytes()):
            if field == 1:  # SentencePiece {piece = 1; score = 2; type = 3}
                piece = {1: b"", 2: 0.0, 3: NORMAL} | dict(_fields(value))
                spec["pieces"].append((piece[1].decode(), piece[2], piece[3]))
            elif field == 2:  # TrainerSpec
                seen_trainer = True
                f = dict(_fields(value))
                spec.update(
                    model_type=f.get(3, UNIGRAM),
                    byte_fallback=bool(f.get(35, 0)),
                    suffix_whitespace=bool(f.get(24, 0)),
                )
            elif field == 3:  # NormalizerSpec
                f = dict(_fields(value))
                spec.update(
                    charsmap=f.get(2, b""),
                    dummy_prefix=bool(f.get(3, 1)),
                    strip_spaces=bool(f.get(4, 1)),
                    escape_spaces=bool(f.get(5, 1)),
                )
    except (IndexError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not a readable sentencepiece model ({e}). Fix: point at the .model file "
            "`megatron-sep tokenizer train` wrote"
        ) from None
    if not spec["pieces"] or not seen_trainer:
        raise ValueError(
            f"{path} is not a complete sentencepiece model (no pieces or no trainer settings). "
            "Fix: point at the .model file `megatron-sep tokenizer train` wrote"
        )
    return spec


def sentencepiece_to_hf(model_file: str | Path):
    """A `tokenizers.Tokenizer` that segments text exactly as the sentencepiece model does."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    spec = read_sentencepiece(model_file)
    pieces = spec["pieces"]
    if spec["suffix_whitespace"] or spec["model_type"] not in (UNIGRAM, BPE):
        raise ValueError(
            f"{model_file}: only bpe and unigram sentencepiece models with the whitespace as a "
            "prefix convert exactly. Fix: train one with `megatron-sep tokenizer train`"
        )
    unk = next(i for i, (_, _, t) in enumerate(pieces) if t == UNKNOWN)
    if spec["model_type"] == BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        model = models.BPE(
            vocab,
            _bpe_merges(pieces, vocab),
            unk_token=pieces[unk][0],
            byte_fallback=spec["byte_fallback"],
            fuse_unk=True,
        )
    else:
        model = models.Unigram(
            [(p, s) for p, s, _ in pieces], unk_id=unk, byte_fallback=spec["byte_fallback"]
        )
    tok = HFTok(model)
    steps = []
    if spec["charsmap"]:
        steps.append(normalizers.Precompiled(spec["charsmap"]))
    if spec["strip_spaces"]:
        steps += [
            normalizers.Strip(left=True, right=True),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if spec["dummy_prefix"]:
        steps.append(normalizers.Prepend(SPACE if spec["escape_spaces"] else " "))
    if spec["escape_spaces"]:
        steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    symbols = sorted((p for p, _, t in pieces if t == USER_DEFINED), key=len, reverse=True)
    if symbols:
        tok.pre_tokenizer = pre_tokenizers.Split(
            Regex("|".join(re.escape(s) for s in symbols)), "isolated"
        )
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["dummy_prefix"]:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens(
        [
            AddedToken(p, special=True, normalized=False)
            for p, _, t in pieces
            if t in (CONTROL, UNKNOWN)
        ]
    )
    return tok


def _bpe_merges(pieces, vocab) -> list[tuple[str, str]]:
    """Every split of a normal piece into two known pieces, ranked by the score of the piece it makes."""
    ranked = []
    for p, score, t in pieces:
        if t != NORMAL or len(p) < 2:
            continue
        for cut in range(1, len(p)):
            a, b = p[:cut], p[cut:]
            if a in vocab and b in vocab:
                ranked.append((-score, vocab[p], vocab[a], vocab[b], a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def write_hf_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for `tok` in `out`."""
    if tok.kind == "sentencepiece":
        sentencepiece_to_hf(tok.path).save(str(out / "tokenizer.json"))
        shutil.copy(tok.path, out / "tokenizer.model")  # for tools that read sentencepiece directly
    else:  # saved from the loaded object: a GPT-2 vocab.json + merges.txt pair becomes one tokenizer.json
        tok.tok.save(str(out / "tokenizer.json"))
    special = {"eos_token": tok.id_to_piece(tok.eod_id)}
    if tok.pad_id is not None:
        special["pad_token"] = tok.id_to_piece(tok.pad_id)
    unk = tok.piece_to_id("<unk>")
    if unk is not None:
        special["unk_token"] = "<unk>"
    # sentencepiece reads a typed "<|endoftext|>" as text, the tokenizers library as the special token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": tok.kind == "sentencepiece",
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
