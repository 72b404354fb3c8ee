"""A plain single-device GPT. Its blocks are built from the parts the config derives from the family
(ModelConfig.parts):

neox:  LayerNorm, GeLU MLP, parallel attention + MLP residual, partial rotary, biases (Pythia).
llama: RMSNorm, SwiGLU MLP, sequential residual, full rotary, GQA, no biases.

No process groups here: parallelism is applied to this model from outside (parallel/), and so is any
other loss than cross-entropy (`model.loss`). Decoding passes a cache (model/cache.py) that attends instead of
the core attention. Variants are subclasses chosen by `build_model` (SUBLLM: model/subllm_model.py).
The fused qkv weight keeps a layout tensor parallelism can split contiguously:
rows grouped per kv head as [q_0 .. q_{g-1}, k, v] (g = heads / kv_heads).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fused_ops
from ..config import Config, ModelConfig
from .attention import AttentionBatch, build_core_attention, prepare_batch, separator_ids_of
from .cache import DecodeCache
from .loss import CrossEntropy


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.parts.norm
        self.eps, self.backend = cfg.norm_eps, cfg.kernels
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size)) if self.kind == "layer" else None

    def forward(self, x, residual=None):
        if self.kind == "layer":
            return fused_ops.layer_norm(x, self.weight, self.bias, self.eps, residual, self.backend)
        return fused_ops.rms_norm(x, self.weight, self.eps, residual, self.backend)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, core, layer: int):
        super().__init__()
        self.layer = layer
        bias = cfg.parts.bias
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.rotary_dim, self.rotary_base, self.kernels = (
            cfg.rotary_dim,
            cfg.rotary_base,
            cfg.kernels,
        )
        qkv_out = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, qkv_out, bias=bias)
        self.out = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.core = core
        self.dropout = cfg.attention_dropout
        self.recompute = False  # selective activation checkpointing: the core attention only

    def forward(self, x, position_ids, batch, cache: DecodeCache | None = None):
        qkv = self.qkv(x)
        b, s = qkv.shape[:2]  # the full sequence, also when x is a sequence-parallel shard
        group = self.heads // self.kv_heads
        qkv = qkv.view(b, s, self.kv_heads, group + 2, self.head_dim)
        q = qkv[:, :, :, :group].reshape(b, s, self.heads, self.head_dim)
        k, v = qkv[:, :, :, group], qkv[:, :, :, group + 1]
        if cache is None or not cache.rotates:  # a cache that rotates does so by cache slot, itself
            q, k = fused_ops.apply_rope(
                q, k, position_ids, self.rotary_dim, self.rotary_base, self.kernels
            )
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:  # decoding: the cache holds earlier keys and applies the mask
            o = cache.attend(self.layer, q, k, v, rope=(self.rotary_dim, self.rotary_base))
        elif self.recompute and torch.is_grad_enabled():
            o = checkpoint(
                self.core,
                q,
                k,
                v,
                batch,
                self.dropout if self.training else 0.0,
                use_reentrant=False,
            )
        else:
            o = self.core(q, k, v, batch, self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.parts.mlp == "swiglu"
        bias = not self.gated
        # SwiGLU keeps gate and up as separate weights: each shards contiguously under TP
        self.gate = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False) if self.gated else None
        self.up = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=bias)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=bias)

    def forward(self, x):
        if self.gated:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, core, layer: int):
        super().__init__()
        self.parallel_residual = cfg.parts.parallel_residual
        self.norm1, self.norm2 = Norm(cfg), Norm(cfg)
        self.attn, self.mlp = Attention(cfg, core, layer), MLP(cfg)
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.recompute = False  # full activation checkpointing: the whole block

    def set_recompute(self, mode: str) -> None:
        """Activation checkpointing as in Megatron: none, full (the block) or selective (core attention)."""
        self.recompute = mode == "full"
        self.attn.recompute = mode == "selective"

    def forward(self, x, position_ids, batch, cache=None):
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, position_ids, batch, cache, use_reentrant=False)
        return self._forward(x, position_ids, batch, cache)

    def _forward(self, x, position_ids, batch, cache):
        a = self.attn(self.norm1(x), position_ids, batch, cache)
        if self.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + self.drop(a) + self.drop(self.mlp(self.norm2(x)))
        h, x = self.norm2(self.drop(a), residual=x)
        return x + self.drop(self.mlp(h))


def padded_vocab(vocab_size: int, multiple: int = 128) -> int:
    return multiple * math.ceil(vocab_size / multiple)


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        if m.vocab_size is None:
            raise ValueError(
                "model.vocab_size is unset: take it from the tokenizer before building the model"
            )
        self.cfg = cfg
        self.vocab_size = m.vocab_size
        self.padded_vocab_size = padded_vocab(m.vocab_size)
        self.embed = nn.Embedding(self.padded_vocab_size, m.hidden_size)
        self.drop = nn.Dropout(m.hidden_dropout)
        self.layers = nn.ModuleList(
            Block(m, build_core_attention(cfg, i), i) for i in range(m.num_layers)
        )
        self.register_buffer(
            "sep_ids", torch.tensor(separator_ids_of(cfg), dtype=torch.long), persistent=False
        )
        self.build_extra(m)
        self.final_norm = Norm(m)
        self.lm_head = nn.Linear(m.hidden_size, self.padded_vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # (head, x, labels) -> mean loss; parallel/ swaps in its own
        self.loss = CrossEntropy(m.fused_loss)
        from .init import init_weights

        init_weights(self, m)
        self.init_extra(m)

    # a variant's own modules, registered before the head (their parameter order is the checkpoint's)
    def build_extra(self, m: ModelConfig) -> None:
        pass

    def init_extra(self, m: ModelConfig) -> None:
        pass

    def forward(
        self, tokens, labels=None, position_ids=None, batch=None, cache: DecodeCache | None = None
    ):
        """tokens [b, s] -> logits [b, s, vocab] or, with labels, the loss (mean cross-entropy).
        `batch` (the AttentionBatch: is_sep, segment_ids, plan) is prepared from tokens unless given;
        `cache` (decoding) holds the earlier tokens' keys and values."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)
        if batch is None:  # per-microbatch attention inputs, computed once for every layer
            # a decoding cache applies the mask itself: no plan (its host syncs would break CUDA graphs)
            batch = (
                AttentionBatch()
                if cache is not None
                else prepare_batch(self.cfg, tokens, self.sep_ids)
            )
        return self.head(
            self.run_layers(self.embed_tokens(tokens), position_ids, batch, cache=cache), labels
        )

    # the pieces of forward, also run one pipeline stage at a time (parallel/pipeline.py)
    def embed_tokens(self, tokens):
        return self.drop(self.embed(tokens))

    def run_layers(self, x, position_ids, batch, indices=None, cache=None):
        """The blocks in order, or those with these global indices (a pipeline chunk)."""
        for layer in self.blocks(indices):
            x = layer(x, position_ids, batch, cache)
        return x

    def blocks(self, indices=None) -> list[nn.Module]:
        if indices is not None:
            return [self._at(self.layers, i) for i in indices]
        return list(self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers)

    def head(self, x, labels=None):
        x = self.final_norm(x)
        if labels is None:
            return self.lm_head(x)[..., : self.vocab_size]
        return self.loss(self.lm_head, x, labels)

    # ---- hooks for pipeline splitting and the trainer; a variant overrides what it needs ----
    def stage_starts(self) -> list[bool] | None:
        """Where a pipeline stage may start: None, any layer."""
        return None

    def keep_stage_parts(self, chunks: list[list[int]]) -> None:
        """A pipeline stage drops the variant's modules it does not run (the blocks are split elsewhere)."""

    def set_train_step(self, step: int) -> None:
        """Step-dependent settings (none in the plain model)."""

    def lr_scale(self, name: str, p) -> float:
        """The learning-rate multiplier of parameter `name` (the engines' parameter groups read it)."""
        return 1.0

    @staticmethod
    def _at(modules, i: int):
        """Module i of a list, or of a pipeline stage's dict keyed by global index."""
        return modules[str(i)] if isinstance(modules, nn.ModuleDict) else modules[i]

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel()
