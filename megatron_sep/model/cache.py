"""The decoding cache protocol the attention calls (inference/ implements it: the full KV cache and its
SUBLLM levels, the bounded SepCache, the static CUDA-graph cache)."""

from __future__ import annotations

from typing import Protocol

import torch


class DecodeCache(Protocol):
    rotates: (
        bool  # applies RoPE itself, by cache slot (StreamingLLM's shift); else keys arrive rotated
    )
    levels: bool  # serves SUBLLM's levels (`level`)
    concepts: object  # DLCM's ConceptState (model/dlcm.py) in a DLCM cache; None in the others

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[int, float] | None = None,
    ) -> torch.Tensor:
        """Store this step's k, v [b, hk, s, d] for `layer` and attend q [b, hq, s, d] over everything kept.
        `rope` (rotary dim, base) is for a cache that rotates."""

    def level(self, level: int, index: torch.Tensor, valid: torch.Tensor) -> "DecodeCache":
        """The cache of the tokens a SUBLLM level keeps (index [b, k], valid [b, k])."""
