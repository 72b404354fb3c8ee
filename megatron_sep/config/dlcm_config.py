"""The dlcm section: DLCM's concept stacks (model.arch: dlcm; docs/dlcm.md). The token-level stacks are the
model section's: model.num_layers token layers at model.hidden_size, the first `encoder_layers` of them
the encoder, the rest the decoder (each decoder layer cross-attends to the concepts first)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

from .model_config import ModelConfig, _require, check_heads


@dataclass
class DLCMConfig:
    encoder_layers: int = 2  # of model.num_layers; the others are the decoder's
    concept_layers: int = 2  # the backbone, over the concept sequence
    concept_hidden_size: int = 512
    concept_heads: int = 8
    concept_kv_heads: Optional[int] = None  # None: concept_heads
    concept_ffn_hidden_size: Optional[int] = None  # None: the family default at concept_hidden_size
    # learned: the router's p >= 0.5; separator: after every separator token, and where the router says;
    # fixed: every target_ratio tokens (the ablation, no router)
    boundary: Literal["learned", "separator", "fixed"] = "learned"
    target_ratio: float = 4.0  # tokens per concept the auxiliary loss aims at (R)
    aux_weight: float = 0.03  # lambda in L_CE + lambda * L_aux (H-Net's value)
    # global: G and F over the whole data-parallel micro-batch (the paper's global parser); sequence: per row
    parser: Literal["global", "sequence"] = "global"
    # mean: a concept is the mean of its tokens, seen from the token after its segment ends;
    # boundary: the segment's first token, seen from that token on (H-Net)
    pooling: Literal["mean", "boundary"] = "mean"
    # decoupled muP: the backbone's matrices start at std / sqrt(m) and learn at lr / m,
    # m = concept_hidden_size / model.hidden_size (the token stacks are the base width)
    mup: bool = False
    concept_bucket: int = (
        64  # the concept sequence is padded to a multiple of this (fewer compiled shapes)
    )

    def check(self) -> None:
        p = "dlcm."
        for k in ("encoder_layers", "concept_layers", "concept_hidden_size", "concept_heads"):
            v = getattr(self, k)
            _require(v >= 1, p + k, v, "must be >= 1", "use a positive integer")
        check_heads(p, ("concept_hidden_size", "concept_heads", "concept_kv_heads"), self)
        _require(
            self.target_ratio > 1.0,
            p + "target_ratio",
            self.target_ratio,
            "must be > 1 (tokens per concept)",
            "use e.g. 4",
        )
        _require(
            self.boundary != "fixed" or float(self.target_ratio).is_integer(),
            p + "target_ratio",
            self.target_ratio,
            "must be a whole number with dlcm.boundary: fixed (a boundary every R tokens)",
            "use e.g. 4",
        )
        _require(
            self.aux_weight >= 0, p + "aux_weight", self.aux_weight, "must be >= 0", "use 0.03"
        )
        _require(
            self.concept_bucket >= 1,
            p + "concept_bucket",
            self.concept_bucket,
            "must be >= 1",
            "use e.g. 64",
        )
        if self.concept_ffn_hidden_size is not None:
            _require(
                self.concept_ffn_hidden_size >= 1,
                p + "concept_ffn_hidden_size",
                self.concept_ffn_hidden_size,
                "must be >= 1",
                "leave it null for the family default",
            )

    @property
    def kv_heads(self) -> int:
        return self.concept_kv_heads or self.concept_heads

    def backbone(self, m: ModelConfig) -> ModelConfig:
        """The backbone's model config: the family's blocks at the concept width."""
        return replace(
            m,
            num_layers=self.concept_layers,
            hidden_size=self.concept_hidden_size,
            num_heads=self.concept_heads,
            num_kv_heads=self.concept_kv_heads,
            ffn_hidden_size=self.concept_ffn_hidden_size,
            structure=None,
        )
