"""Resolve SepLLM separator strings to token ids for a tokenizer."""
from __future__ import annotations

DEFAULT_SEPARATORS = [".", ",", "?", "!", ";", ":", " ", "\t", "\n"]
# How whitespace is spelled inside vocabularies: sentencepiece's ▁, byte-level BPE's Ġ/ĉ/Ċ.
_SPELLINGS = {" ": ["▁", "Ġ"], "\t": ["ĉ", "<0x09>"], "\n": ["Ċ", "<0x0A>"]}


def resolve_separator_ids(tokenizer, strings=None) -> tuple[list[int], list[str]]:
    """Token ids for the separator strings, and a warning for each string that is not one token."""
    ids, warnings = [], []
    for s in DEFAULT_SEPARATORS if strings is None else strings:
        found = tokenizer.piece_to_id(s)
        if found is None:
            for alt in _SPELLINGS.get(s, []):
                if (found := tokenizer.piece_to_id(alt)) is not None:
                    break
        if found is None:
            enc = tokenizer.encode(s)
            if len(enc) == 1:
                found = enc[0]
        if found is None:
            warnings.append(f"separator {s!r} is not a single token in {tokenizer.path} (it encodes as "
                            f"{tokenizer.encode(s)}); it is ignored. Fix: list explicit ids or retrain "
                            "the tokenizer with it as a symbol")
        elif found not in ids:
            ids.append(found)
    return ids, warnings
