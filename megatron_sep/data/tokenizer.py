"""One tokenizer interface over sentencepiece models, HF `tokenizer.json` files and GPT-2 BPE
`vocab.json` + `merges.txt` pairs (Megatron-LM's and GPT-NeoX's GPT2BPETokenizer)."""
from __future__ import annotations

from pathlib import Path
from ..errors import first_line

EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
PAD_NAMES = ("<pad>", "<|padding|>", "[PAD]")


class TokenizerError(ValueError):
    pass


class Tokenizer:
    kind: str
    path: Path
    vocab_size: int
    eod_id: int
    pad_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int | None:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        eod = self.sp.eos_id()
        if eod < 0:
            eod = next((i for n in EOD_NAMES if (i := self.piece_to_id(n)) is not None), -1)
        if eod < 0:
            raise TokenizerError(f"{path} has no end-of-document token. Fix: train it with an EOS piece "
                                 "(`megatron-sep tokenizer train` adds <|endoftext|>)")
        self.eod_id = eod
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i):
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece):
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: Path, tok=None):
        from tokenizers import Tokenizer as _Tok

        self.path = path
        if tok is None:
            try:
                tok = _Tok.from_file(str(path))
            except Exception as e:  # the Rust library raises plain Exceptions with multi-line texts
                raise TokenizerError(f"{path} is not an HF tokenizer.json ({first_line(e)}). "
                                     "Fix: pass a tokenizer.json saved by tokenizers or transformers") from None
        self.tok = tok
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eod = next((i for n in EOD_NAMES if (i := self.tok.token_to_id(n)) is not None), None)
        if eod is None:
            raise TokenizerError(f"{path} has no end-of-document token (looked for {', '.join(EOD_NAMES)}). "
                                 "Fix: add one as a special token")
        self.eod_id = eod
        self.pad_id = next((i for n in PAD_NAMES if (i := self.tok.token_to_id(n)) is not None), None)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i):
        return self.tok.id_to_token(int(i))

    def piece_to_id(self, piece):
        return self.tok.token_to_id(piece)


def gpt2_bpe(vocab: Path) -> HFTokenizer:
    """GPT-2's byte-level BPE from its vocab.json and the merges.txt beside it (Megatron's and NeoX's
    --vocab-file / --merge-file): the GPT-2 split pattern, bytes to unicode, <|endoftext|> kept whole."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers

    merges = next((m for m in (vocab.with_name("merges.txt"), vocab.with_name(vocab.name.replace("vocab.json",
                   "merges.txt"))) if m.is_file()), None)
    if merges is None:
        raise TokenizerError(f"{vocab} is a GPT-2 BPE vocabulary but no merges.txt lies beside it. "
                             "Fix: put the merges file next to it as merges.txt")
    try:
        tok = _Tok(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:
        raise TokenizerError(f"{vocab} + {merges.name} do not load as GPT-2 BPE ({first_line(e)}). "
                             "Fix: pass Megatron's / GPT-2's vocab.json and merges.txt") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [n for n in EOD_NAMES + PAD_NAMES if tok.token_to_id(n) is not None]
    tok.add_special_tokens(specials)  # existing ids: encoded whole, never split into bytes
    return HFTokenizer(vocab, tok)


def _is_vocab_json(p: Path) -> bool:
    """A flat {token: id} mapping (GPT-2's vocab.json), not a tokenizer.json (which has "model")."""
    import json
    if p.name.endswith("vocab.json"):
        return True
    if p.name == "tokenizer.json":  # HF's name: a broken one should be reported as one
        return False
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return False  # HFTokenizer then names the problem
    return isinstance(data, dict) and "model" not in data and all(isinstance(v, int) for v in list(data.values())[:100])


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Every id gives the same piece: models of the two tokenizers compare token ids."""
    return a.vocab_size == b.vocab_size and all(a.id_to_piece(i) == b.id_to_piece(i) for i in range(a.vocab_size))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A sentencepiece `.model`, an HF `tokenizer.json`, a GPT-2 `vocab.json` (with `merges.txt` beside it),
    or a folder holding one of them."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise TokenizerError(f"{path} holds none of tokenizer.json, tokenizer.model, vocab.json + merges.txt. "
                                 "Fix: point data.tokenizer (or --tokenizer) at a tokenizer file or folder")
    if p.name == "merges.txt" and p.with_name("vocab.json").is_file():
        p = p.with_name("vocab.json")
    if not p.is_file():
        raise TokenizerError(f"tokenizer {path} not found. Fix: train one with `megatron-sep tokenizer train` "
                             "or correct data.tokenizer (or --tokenizer)")
    if p.suffix == ".json":
        return gpt2_bpe(p) if _is_vocab_json(p) else HFTokenizer(p)
    try:
        return SentencePieceTokenizer(p)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{p} is not a sentencepiece model ({e}). "
                             "Fix: pass a .model file or an HF tokenizer.json") from None
