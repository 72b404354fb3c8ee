"""A plain single-device GPT covering two families.

neox:  LayerNorm, GeLU MLP, parallel attention + MLP residual, partial rotary, biases (Pythia).
llama: RMSNorm, SwiGLU MLP, sequential residual, full rotary, GQA, no biases.

No process groups here: parallelism is applied to this model from outside.
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
from .attention import AttentionBatch, build_core_attention, prepare_batch, separator_ids_of, subsample_batch
from .loss import TeacherTargets, distill_loss, linear_cross_entropy
from ..config.structure import chunk_structure, parse_structure, skip_level, stage_starts
from .subllm import Bypass, Downsample, bypass_minimum, gather_seq, pad_selection, upsample


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = "layer" if cfg.family == "neox" else "rms"
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
        bias = cfg.family == "neox"
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.rotary_dim, self.rotary_base, self.kernels = cfg.rotary_dim, cfg.rotary_base, cfg.kernels
        qkv_out = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, qkv_out, bias=bias)
        self.out = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.core = core
        self.dropout = cfg.attention_dropout
        self.recompute = False  # selective activation checkpointing: the core attention only

    def forward(self, x, position_ids, batch):
        qkv = self.qkv(x)
        b, s = qkv.shape[:2]  # the full sequence, also when x is a sequence-parallel shard
        group = self.heads // self.kv_heads
        qkv = qkv.view(b, s, self.kv_heads, group + 2, self.head_dim)
        q = qkv[:, :, :, :group].reshape(b, s, self.heads, self.head_dim)
        k, v = qkv[:, :, :, group], qkv[:, :, :, group + 1]
        cache = batch.kv_cache  # decoding: the cache holds earlier keys and applies the mask
        in_cache = getattr(cache, "rotates", False)  # a streaming cache that rotates by cache slot
        if not in_cache:
            q, k = fused_ops.apply_rope(q, k, position_ids, self.rotary_dim, self.rotary_base, self.kernels)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if in_cache:
            o = cache.attend(self.layer, q, k, v, rope=(self.rotary_dim, self.rotary_base))
        elif cache is not None:
            o = cache.attend(self.layer, q, k, v)
        elif self.recompute and torch.is_grad_enabled():
            o = checkpoint(self.core, q, k, v, batch, self.dropout if self.training else 0.0, use_reentrant=False)
        else:
            o = self.core(q, k, v, batch, self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.family == "llama"
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
        self.parallel_residual = cfg.family == "neox"
        self.norm1, self.norm2 = Norm(cfg), Norm(cfg)
        self.attn, self.mlp = Attention(cfg, core, layer), MLP(cfg)
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.recompute = False  # full activation checkpointing: the whole block

    def set_recompute(self, mode: str) -> None:
        """Activation checkpointing as in Megatron: none, full (the block) or selective (core attention)."""
        self.recompute = mode == "full"
        self.attn.recompute = mode == "selective"

    def forward(self, x, position_ids, batch):
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, position_ids, batch, use_reentrant=False)
        return self._forward(x, position_ids, batch)

    def _forward(self, x, position_ids, batch):
        if self.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            a = self.attn(self.norm1(x), position_ids, batch)
            return x + self.drop(a) + self.drop(self.mlp(self.norm2(x)))
        a = self.attn(self.norm1(x), position_ids, batch)
        h, x = self.norm2(self.drop(a), residual=x)
        return x + self.drop(self.mlp(h))


def padded_vocab(vocab_size: int, multiple: int = 128) -> int:
    return multiple * math.ceil(vocab_size / multiple)


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        if m.vocab_size is None:
            raise ValueError("model.vocab_size is unset: take it from the tokenizer before building the model")
        self.cfg = cfg
        self.vocab_size = m.vocab_size
        self.padded_vocab_size = padded_vocab(m.vocab_size)
        self.embed = nn.Embedding(self.padded_vocab_size, m.hidden_size)
        self.drop = nn.Dropout(m.hidden_dropout)
        self.layers = nn.ModuleList(
            Block(m, build_core_attention(cfg, i), i) for i in range(m.num_layers))
        self.register_buffer("sep_ids", torch.tensor(separator_ids_of(cfg), dtype=torch.long),
                             persistent=False)
        self.structure = None  # SUBLLM: the structure's characters (model/subllm.py)
        self.seq_shards = None  # set by parallel/tensor.py under sequence parallelism (SeqShards)
        if m.subsampled:
            self.structure = parse_structure(m.structure, m.num_layers)
            self.down = nn.ModuleList(Downsample(m.hidden_size, k, m.subsample_causal) for k in m.level_keeps())
            self.bypass = nn.ModuleList(Bypass(m.hidden_size) for _ in self.down)
        self.final_norm = Norm(m)
        self.lm_head = nn.Linear(m.hidden_size, self.padded_vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        from .init import init_weights
        init_weights(self, m)
        for d in getattr(self, "down", ()):  # scores of about unit size from a unit-size stream
            nn.init.normal_(d.score.weight, std=m.hidden_size ** -0.5)

    def forward(self, tokens, labels=None, position_ids=None, batch=None):
        """tokens [b, s] -> logits [b, s, vocab] or, with labels, the mean cross-entropy.
        `batch` (the AttentionBatch: is_sep, segment_ids, plan) is prepared from tokens unless given."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)
        if batch is None:  # per-microbatch attention inputs, computed once for every layer
            batch = prepare_batch(self.cfg, tokens, self.sep_ids)
        return self.head(self.run_layers(self.embed_tokens(tokens), position_ids, batch), labels)

    # the pieces of forward, also run one pipeline stage at a time (parallel/pipeline.py)
    def embed_tokens(self, tokens):
        return self.drop(self.embed(tokens))

    def run_layers(self, x, position_ids, batch, indices=None):
        """The blocks in order, or those with these global indices (a pipeline chunk)."""
        if self.structure is not None:
            if indices is None:
                return self.run_structure(x, position_ids, batch, self.structure, 0, 0)
            chars, level = chunk_structure(self.structure, list(indices))
            return self.run_structure(x, position_ids, batch, chars, indices[0], level)
        layers = self.layers
        if indices is not None:
            layers = [self._at(layers, i) for i in indices]
        elif isinstance(layers, nn.ModuleDict):
            layers = layers.values()
        for layer in layers:
            x = layer(x, position_ids, batch)
        return x

    def stage_starts(self) -> list[bool] | None:
        """Where a pipeline stage may start: any layer, or with SUBLLM only outside every ( ... )."""
        return None if self.structure is None else stage_starts(self.structure)

    def keep_levels_of(self, chunks: list[list[int]]) -> None:
        """A pipeline stage keeps the scorers and bypasses of the levels in its chunks (names unchanged)."""
        if self.structure is None:
            return
        mine = set()
        for layers in chunks:
            chars, first = chunk_structure(self.structure, layers)
            mine.update(range(first, first + chars.count("(")))
        for name in ("down", "bypass"):
            setattr(self, name, nn.ModuleDict({str(i): m for i, m in enumerate(getattr(self, name)) if i in mine}))

    def run_structure(self, x, position_ids, batch, chars, layer, level):
        """SUBLLM: the blocks of `chars` (from block `layer` and level `level` on) in order; each ( ... ) runs
        on the tokens its scorer keeps, in order, at their own positions, with their is_sep (model/subllm.py)."""
        cache = batch.kv_cache
        if cache is not None and not hasattr(cache, "level"):
            raise ValueError("a model with a subsampling model.structure decodes with the full KV cache only "
                             "(cache full), not the bounded SepCache")
        b = x.shape[0]  # x may be a sequence-parallel shard; positions cover the whole sequence
        pos = position_ids.expand(b, -1) if position_ids.dim() == 1 else position_ids
        shards = self.seq_shards if cache is None else None  # sequence parallelism (training only)
        stack, i = [], 0
        while i < len(chars):
            c = chars[i]
            i += 1
            if c == "T":
                x = self._at(self.layers, layer)(x, pos, batch)
                layer += 1
            elif c == "(":
                if shards is not None:  # the level selects over the whole sequence
                    x = shards.gather(x)
                sel = self._at(self.down, level)(x)
                if shards is not None:
                    sel = pad_selection(sel, shards.size, x.shape[1])
                if cache is not None and not sel.valid.any():  # decoding, nothing kept: the level is a no-op
                    end = skip_level(chars, i - 1)
                    layer += chars[i:end].count("T")
                    level += chars[i - 1:end].count("(")
                    i = end + 1
                    continue
                stack.append((x, pos, batch, sel, level))
                level += 1
                pos = torch.gather(pos, 1, sel.index)
                batch = (AttentionBatch(kv_cache=batch.kv_cache.level(level - 1, sel.index, sel.valid))
                         if cache is not None else subsample_batch(self.cfg, batch, sel.index))
                x = gather_seq(x, sel.index)
                if shards is not None:
                    x = shards.split(x)
            else:
                outer, pos, batch, sel, lv = stack.pop()
                if shards is not None:
                    x = shards.gather(x)
                x = self._at(self.bypass, lv)(outer, upsample(outer, x, sel))
                if shards is not None:
                    x = shards.split(x)
        return x

    @staticmethod
    def _at(modules, i: int):
        """Module i of a list, or of a pipeline stage's dict keyed by global index."""
        return modules[str(i)] if isinstance(modules, nn.ModuleDict) else modules[i]

    def set_train_step(self, step: int) -> None:
        """Step-dependent settings: the SUBLLM bypass scale's minimum."""
        for m in self.modules():
            if isinstance(m, Bypass):
                m.minimum = bypass_minimum(step, self.cfg.model.bypass_warmup_steps)

    def head(self, x, labels=None):
        x = self.final_norm(x)
        if labels is None:
            return self.lm_head(x)[..., : self.vocab_size]
        if isinstance(labels, TeacherTargets):  # distillation (train.distill_from): the logits are needed whole
            return distill_loss(self.lm_head(x)[..., : self.vocab_size], labels)
        if self.cfg.model.fused_loss:
            head = self.lm_head
            if hasattr(head, "gather_input"):  # a vocabulary-parallel head: this rank's rows of the vocabulary
                return linear_cross_entropy(head.gather_input(x), head.weight, labels, head.start, head.group)
            return linear_cross_entropy(x, head.weight, labels)
        return self.loss_fn(self.lm_head(x), labels)

    @staticmethod
    def loss_fn(logits, labels):
        """Mean token cross-entropy; tensor parallelism swaps in the vocab-parallel one."""
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel()
