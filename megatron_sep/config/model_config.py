"""The model and attention sections of the config: shapes, the block parts a family means, SUBLLM's
structure, and the SepLLM attention variants (the rest of the config: schema.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ..errors import ConfigError


def _require(ok: bool, key: str, value, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(key, value, problem, fix)


def check_heads(prefix: str, keys: tuple[str, str, str], section) -> None:
    """Heads divide the width, kv heads (null: the heads) divide the heads: for keys (width, heads, kv heads)
    of a config section (the model's, or DLCM's backbone)."""
    width_key, heads_key, kv_key = keys
    width, heads, kv = (getattr(section, k) for k in keys)
    _require(
        width % heads == 0,
        prefix + heads_key,
        heads,
        f"does not divide {prefix}{width_key}={width}",
        f"pick {heads_key} so that {width_key} / {heads_key} is an integer",
    )
    _require(
        (kv or heads) >= 1 and heads % (kv or heads) == 0,
        prefix + kv_key,
        kv,
        f"must divide {prefix}{heads_key}={heads}",
        f"use a divisor of {heads_key} (or null)",
    )


@dataclass(frozen=True)
class BlockParts:
    """What a family means for the model's blocks, derived here once (the model never tests the family)."""

    norm: Literal["layer", "rms"]
    mlp: Literal["gelu", "swiglu"]
    parallel_residual: bool  # x + attn(ln1(x)) + mlp(ln2(x)), else sequential
    bias: bool  # on the attention and MLP linear layers
    init: Literal["neox", "scaled_normal"]  # init_method auto


FAMILY_PARTS = {
    "neox": BlockParts("layer", "gelu", parallel_residual=True, bias=True, init="neox"),
    "llama": BlockParts("rms", "swiglu", parallel_residual=False, bias=False, init="scaled_normal"),
}


@dataclass
class ModelConfig:
    family: Literal["neox", "llama"] = "llama"
    arch: Literal["gpt", "dlcm"] = (
        "gpt"  # dlcm: concepts between the token stacks (the dlcm section)
    )
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: same as num_heads (no GQA)
    ffn_hidden_size: Optional[int] = None  # None: 4h (neox) or 8h/3 rounded to 64 (llama)
    vocab_size: Optional[int] = None  # None: from the tokenizer
    max_position_embeddings: int = 2048
    rotary_pct: float = 1.0
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_method: Literal["auto", "neox", "scaled_normal", "normal"] = "auto"
    init_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # fused norms / RoPE: Triton on CUDA; with train.precision fp8 and compile, auto means reference (the
    # inductor-generated code, which fuses each norm with the next float8 cast)
    kernels: Literal["auto", "triton", "reference"] = "auto"
    fused_loss: bool = (
        True  # LM head + cross-entropy in chunks of tokens: no full [tokens, vocab] logits
    )
    # SUBLLM (model/subllm.py): T a block, ( learned downsampling, ) upsampling + bypass; None: T * num_layers
    structure: Optional[str] = None
    subsample_keep: Union[float, list[float]] = (
        0.64  # share of tokens each ( keeps: one value, or one per (
    )
    subsample_causal: bool = False  # keep positive scores in training too (no top-k look-ahead)
    bypass_warmup_steps: int = (
        20000  # the bypass scale's minimum falls from 0.9 to 0.2 over these steps
    )

    def check(self) -> None:
        p = "model."
        for k in ("num_layers", "hidden_size", "num_heads", "max_position_embeddings"):
            _require(
                getattr(self, k) >= 1,
                p + k,
                getattr(self, k),
                "must be >= 1",
                "use a positive integer",
            )
        check_heads(p, ("hidden_size", "num_heads", "num_kv_heads"), self)
        _require(
            0.0 < self.rotary_pct <= 1.0,
            p + "rotary_pct",
            self.rotary_pct,
            "must be in (0, 1]",
            "use e.g. 0.25 (Pythia) or 1.0 (Llama)",
        )
        rot = self.rotary_dim
        _require(
            rot % 2 == 0 and rot >= 2,
            p + "rotary_pct",
            self.rotary_pct,
            f"gives an odd or empty rotary dim {rot} for head dim {self.head_dim}",
            "choose rotary_pct so head_dim * rotary_pct is a positive even integer",
        )
        _require(self.norm_eps > 0, p + "norm_eps", self.norm_eps, "must be > 0", "use e.g. 1e-5")
        _require(self.init_std > 0, p + "init_std", self.init_std, "must be > 0", "use e.g. 0.02")
        for k in ("hidden_dropout", "attention_dropout"):
            v = getattr(self, k)
            _require(0.0 <= v < 1.0, p + k, v, "must be in [0, 1)", "use 0.0 for pretraining")
        if self.vocab_size is not None:
            _require(
                self.vocab_size >= 2,
                p + "vocab_size",
                self.vocab_size,
                "must be >= 2",
                "leave it null to take the tokenizer's size",
            )
        if self.ffn_hidden_size is not None:
            _require(
                self.ffn_hidden_size >= 1,
                p + "ffn_hidden_size",
                self.ffn_hidden_size,
                "must be >= 1",
                "leave it null for the family default",
            )
        self._check_structure()

    def _check_structure(self) -> None:
        from .structure import levels, parse_structure

        if self.structure is None:
            return
        try:
            chars = parse_structure(self.structure, self.num_layers)
        except ValueError as e:
            raise ConfigError(
                "model.structure",
                self.structure,
                str(e),
                "write it as SUBLLM does, e.g. TT(TT(TT)TT)TT, with one T per layer",
            ) from None
        keep = self.subsample_keep
        keeps = keep if isinstance(keep, list) else [keep]
        _require(
            all(0.0 < k <= 1.0 for k in keeps),
            "model.subsample_keep",
            keep,
            "must be in (0, 1]",
            "use e.g. 0.64 (SUBLLM's 1.3B model)",
        )
        _require(
            not isinstance(keep, list) or len(keep) == levels(chars),
            "model.subsample_keep",
            keep,
            f"has {len(keeps)} entries for the {levels(chars)} ( in model.structure",
            "give one keep ratio per (, or a single number",
        )
        _require(
            self.bypass_warmup_steps >= 1,
            "model.bypass_warmup_steps",
            self.bypass_warmup_steps,
            "must be >= 1",
            "use e.g. 20000",
        )

    def level_keeps(self) -> list[float]:
        """The keep ratio of each ( in order; empty without subsampling."""
        from .structure import levels, parse_structure

        if self.structure is None:
            return []
        n = levels(parse_structure(self.structure, self.num_layers))
        return (
            list(self.subsample_keep)
            if isinstance(self.subsample_keep, list)
            else [self.subsample_keep] * n
        )

    @property
    def subsampled(self) -> bool:
        return any(k < 1.0 for k in self.level_keeps())

    @property
    def parts(self) -> BlockParts:
        return FAMILY_PARTS[self.family]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(round(self.head_dim * self.rotary_pct))

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.family == "neox":
            return 4 * self.hidden_size
        return 64 * ((8 * self.hidden_size // 3 + 63) // 64)


@dataclass
class AttentionConfig:
    kind: Literal["dense", "sepllm", "streamingllm", "fixed_interval"] = "dense"
    init_tokens: int = 3
    window: Union[int, list[int]] = 64  # one n for every layer, or one per layer
    hybrid: Literal["none", "H", "HT", "HMT"] = "none"  # these layers stay dense
    # separator strings resolved with the tokenizer, or explicit token ids
    separators: list[Union[int, str]] = field(
        default_factory=lambda: [".", ",", "?", "!", ";", ":", " ", "\t", "\n"]
    )
    fixed_interval: int = 8  # fixed_interval kind: every k-th position acts as a separator
    reset_per_document: bool = False
    eod_id: Optional[int] = None  # document end for reset_per_document; filled from the tokenizer
    backend: Literal["auto", "reference", "flex", "triton"] = "auto"
    # false: the Triton backward adds the kept keys' dQ with fp32 atomics (faster, last bits vary per run)
    deterministic: bool = True
    stats_interval: int = 100  # steps between kept-pair statistics (0: never)

    def check(self) -> None:
        p = "attention."
        _require(
            self.init_tokens >= 0, p + "init_tokens", self.init_tokens, "must be >= 0", "use e.g. 3"
        )
        windows = self.window if isinstance(self.window, list) else [self.window]
        _require(
            bool(windows) and all(w >= 1 for w in windows),
            p + "window",
            self.window,
            "every window must be >= 1 (it counts the query itself)",
            "use e.g. 64",
        )
        _require(
            self.fixed_interval >= 1,
            p + "fixed_interval",
            self.fixed_interval,
            "must be >= 1",
            "use e.g. 8",
        )
        _require(
            self.stats_interval >= 0,
            p + "stats_interval",
            self.stats_interval,
            "must be >= 0",
            "use 0 to turn statistics off",
        )
        if self.kind == "sepllm":
            _require(
                bool(self.separators),
                p + "separators",
                self.separators,
                "is empty for kind sepllm",
                "list separator strings or ids, or use kind streamingllm",
            )

    def layer_windows(self, num_layers: int, seq_len: int) -> list[int | None]:
        """Window per layer; None marks a dense layer."""
        if self.kind == "dense":
            return [None] * num_layers
        windows = list(self.window) if isinstance(self.window, list) else [self.window] * num_layers
        dense = {
            "none": set(),
            "H": {0},
            "HT": {0, num_layers - 1},
            "HMT": {0, num_layers // 2, num_layers - 1},
        }[self.hybrid]
        return [None if (i in dense or w >= seq_len) else w for i, w in enumerate(windows)]
