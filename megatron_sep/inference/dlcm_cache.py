"""DLCM's decoding cache: the token layers' full KV cache (SepLLM eviction included), and the concept state
(model/dlcm.py ConceptState) with the backbone's own KV cache over concept slots. One row at a time: rows
close segments at different tokens, so their backbone caches grow apart."""

from __future__ import annotations

import dataclasses

import torch

from ..config import Config
from ..model.dlcm import ConceptState
from .cache import SepKVCache


class DLCMCache(SepKVCache):
    levels = False  # no SUBLLM levels

    def __init__(self, cfg: Config, sep_ids: torch.Tensor, evict: bool = False):
        super().__init__(cfg, sep_ids, evict=evict)
        backbone = dataclasses.replace(
            cfg,
            model=cfg.dlcm.backbone(cfg.model),
            attention=dataclasses.replace(cfg.attention, kind="dense", window=64, hybrid="none"),
        )
        self.concepts = ConceptState(backbone=SepKVCache(backbone, sep_ids[:0]))

    def begin(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[0] != 1:
            raise ValueError(
                f"DLCM decodes one sequence at a time, not a batch of {tokens.shape[0]}: "
                "generate each prompt on its own"
            )
        return super().begin(tokens)

    def mark(self) -> None:
        raise ValueError(
            "speculative decoding does not serve DLCM models yet (no concept rollback)"
        )

    def level(self, level, index, valid):
        raise ValueError("a DLCM model has no SUBLLM levels")
