"""One tokenizer interface over sentencepiece models and HF `tokenizer.json` files."""
from __future__ import annotations

from pathlib import Path

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

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        self.path = path
        self.tok = _Tok.from_file(str(path))
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A sentencepiece `.model`, an HF `tokenizer.json`, or a folder holding either."""
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise TokenizerError(f"{path} holds neither tokenizer.json nor tokenizer.model. "
                                 "Fix: point data.tokenizer at a tokenizer file")
    if not p.is_file():
        raise TokenizerError(f"tokenizer {path} not found. Fix: train one with `megatron-sep tokenizer train` "
                             "or correct data.tokenizer")
    if p.suffix == ".json":
        return HFTokenizer(p)
    try:
        return SentencePieceTokenizer(p)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{p} is not a sentencepiece model ({e}). "
                             "Fix: pass a .model file or an HF tokenizer.json") from None
