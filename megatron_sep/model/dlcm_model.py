"""DLCM as a model class (model.arch: dlcm; the modules and the causality rule are in model/dlcm.py): token
encoder -> boundaries -> concepts -> concept backbone -> token decoder with cross-attention -> head.

model.layers holds the token layers (encoder first, then decoder, so SepLLM's per-layer windows and the
token KV cache count them as one stack); concept_layers the backbone, at the dlcm section's width. The
discrete segmentation stays out of the LM loss's gradient: the router learns from the compression loss only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import ModelConfig
from .attention import AttentionBatch, dense_causal, prepare_batch
from .dlcm import (
    ConceptState,
    CrossAttention,
    Router,
    compression_loss,
    pool,
    segment_sums,
    visible_slots,
)
from .gpt import GPT, Block, Norm
from .init import init_weights


class DLCM(GPT):
    parser_sum = None  # parallel/ installs the data-parallel sum of the parser's statistics

    def build_extra(self, m: ModelConfig) -> None:
        d = self.cfg.dlcm
        bm = d.backbone(m)
        self.encoder_layers = d.encoder_layers
        self.router = Router(m.hidden_size) if d.boundary != "fixed" else None
        self.up = nn.Linear(m.hidden_size, d.concept_hidden_size, bias=False)
        self.null = nn.Parameter(torch.zeros(d.concept_hidden_size))
        self.concept_layers = nn.ModuleList(
            Block(bm, dense_causal, i) for i in range(d.concept_layers)
        )
        self.concept_norm = Norm(bm)
        self.xattn = nn.ModuleList(
            CrossAttention(m, d.concept_hidden_size, Norm(m))
            for _ in range(m.num_layers - d.encoder_layers)
        )
        self.stats: dict = {}  # the last training forward's boundary statistics (detached)

    def init_extra(self, m: ModelConfig) -> None:
        d = self.cfg.dlcm
        bm = d.backbone(m)
        init_weights(self.concept_layers, bm)  # scaled by the backbone's depth and width
        nn.init.normal_(self.null, std=m.init_std)
        if self.router is not None:
            self.router.reset()
        # decoupled muP: the backbone's matrices at width multiplier w over the token stacks
        if d.mup:
            w = d.concept_hidden_size / m.hidden_size
            for p in self.concept_layers.parameters():
                if p.dim() >= 2:
                    p.data.div_(math.sqrt(w))

    def lr_scale(self, name: str, p) -> float:
        """The engines' per-parameter learning-rate multiplier: 1/w on the backbone's matrices with muP."""
        d, m = self.cfg.dlcm, self.cfg.model
        if d.mup and name.startswith("concept_layers.") and p.dim() >= 2:
            return m.hidden_size / d.concept_hidden_size
        return 1.0

    # ---- the parts a trainer or a pipeline sees ----
    def blocks(self, indices=None) -> list[nn.Module]:
        if indices is not None:
            raise ValueError("DLCM does not run as pipeline chunks (parallel.pp must be 1)")
        return list(self.layers) + list(self.concept_layers)

    def run_layers(self, x, position_ids, batch, indices=None, cache=None):
        raise ValueError("DLCM runs whole (its forward): the concepts sit between the token stacks")

    def forward(self, tokens, labels=None, position_ids=None, batch=None, cache=None):
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)
        if batch is None:
            batch = prepare_batch(self.cfg, tokens, self.sep_ids)
        state = None
        if cache is not None:
            state = cache.concepts
            if state is None:
                raise ValueError(
                    "a DLCM model decodes with its own cache (inference.generate.make_cache builds it)"
                )
        x = self.encode(tokens, position_ids, batch, cache)
        p, b = self.route(x, tokens, position_ids, state)
        if state is None:
            z, limit = self.concepts(x, b)
        else:
            z, limit = self.new_concepts(x, b, state)
        mask = None
        for i, layer in enumerate(self.layers[self.encoder_layers :]):
            xa = self.xattn[i]
            k, v = xa.kv(z)
            if state is not None:
                k, v = state.extend(i, k, v)
            if mask is None:
                mask = visible_slots(limit, k.shape[2])
            x = layer(xa(x, k, v, mask), position_ids, batch, cache)
        if labels is None:
            return self.head(x)
        loss = self.head(x, labels)
        return self.with_compression_loss(loss, p, b)

    def encode(self, tokens, position_ids=None, batch=None, cache=None):
        """The encoder's token states [b, s, d]."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)
        if batch is None:
            batch = prepare_batch(self.cfg, tokens, self.sep_ids)
        x = self.embed_tokens(tokens)
        for layer in self.layers[: self.encoder_layers]:
            x = layer(x, position_ids, batch, cache)
        return x

    def with_compression_loss(self, loss, p, b):
        """Training adds lambda * L_aux (the router's only gradient); evaluation returns cross-entropy alone,
        comparable with a dense model's."""
        d = self.cfg.dlcm
        if not self.training:
            return loss
        if d.boundary == "fixed":
            aux, rate = loss.new_zeros(()), b.float().mean()
        else:
            aux, rate = compression_loss(
                p, b, d.target_ratio, d.parser == "sequence", self.parser_sum
            )
        self.stats = {
            "ce_loss": loss.detach(),
            "aux_loss": aux.detach(),
            "boundary_rate": rate.detach(),
        }
        return loss + d.aux_weight * aux if d.aux_weight else loss

    # ---- boundaries and concepts ----
    def route(self, h, tokens, position_ids, state):
        """(p [b, s] fp32 with the gradient the compression loss uses, boundaries b [b, s] bool)."""
        d = self.cfg.dlcm
        first = position_ids == 0
        if d.boundary == "fixed":
            b = (position_ids % int(d.target_ratio) == 0).expand(tokens.shape)
            return b.float(), b
        p, last_q = self.router(h, None if state is None else state.prev_q)
        p = torch.where(first, 1.0, p)
        if d.boundary == "separator":  # a segment ends at a separator: the next token starts one
            sep = torch.isin(tokens, self.sep_ids)
            prev = state.last_sep if state is not None else None
            if prev is None:
                prev = sep.new_zeros(sep.shape[0], 1)
            after_sep = torch.cat([prev, sep[:, :-1]], 1)
            p = torch.where(after_sep, 1.0, p)  # certain: counted as such in G, no gradient
            if state is not None:
                state.last_sep = sep[:, -1:]
        if state is not None:
            state.prev_q = last_q
        return p, p >= 0.5

    def concepts(self, h, b):
        """A whole sequence: the backbone's outputs [b, slots, d_c] (slot 0 the null concept, slot j + 1
        concept j; padded to dlcm.concept_bucket, past the last concept) and each token's last visible slot."""
        d, bsz, s = self.cfg.dlcm, h.shape[0], h.shape[1]
        seg = b.long().cumsum(1) - 1
        most = int(b.sum(1).max())  # a host sync: the backbone's length
        slots = min(s + 1, -(-(most + 1) // d.concept_bucket) * d.concept_bucket)
        c = self.up(pool(h, seg, b, slots - 1, d.pooling))
        z = torch.cat([self.null.to(c.dtype).expand(bsz, 1, -1), c], 1)
        z = self.backbone(z, torch.arange(slots, device=h.device), None)
        return z, seg + (d.pooling == "boundary")

    def new_concepts(self, h, b, state: ConceptState):
        """Decoding, one row: the concepts this chunk completes go through the backbone's cache; returns
        their outputs and each new token's last visible slot."""
        d = self.cfg.dlcm  # one row: DLCMCache.begin refuses a batch
        # 0: the segment open before this chunk; j: the j-th started here
        local = b.long().cumsum(1)
        started = int(local[0, -1])
        if d.pooling == "mean":  # sums per local segment, the open one's earlier part added
            sums, counts = segment_sums(h, local, started + 1)
            if state.open_sum is not None:
                sums[:, 0] += state.open_sum
                counts[:, 0] += state.open_count
            # local segment 0 is empty at the stream start
            closed = slice(1 if state.segments == 0 else 0, started)
            new = (sums[:, closed] / counts[:, closed, None]).to(h.dtype)
            state.open_sum, state.open_count = sums[:, started], counts[:, started]
        else:
            new = h[b].reshape(1, -1, h.shape[-1])
        first_slot = state.segments + (d.pooling == "boundary") if state.segments else 0
        z = self.up(new)
        if state.segments == 0:  # the stream's first chunk: the null concept first
            z = torch.cat([self.null.to(z.dtype).expand(1, 1, -1), z], 1)
        limit = state.segments - 1 + local + (d.pooling == "boundary")
        state.segments += started
        if z.shape[1]:
            pos = torch.arange(first_slot, first_slot + z.shape[1], device=h.device)
            z = self.backbone(z, pos, state.backbone)
        return z, limit

    def backbone(self, z, position_ids, cache):
        if cache is not None:
            cache.begin(torch.zeros(1, z.shape[1], dtype=torch.long, device=z.device))
        for layer in self.concept_layers:
            z = layer(z, position_ids, AttentionBatch(), cache)
        return self.concept_norm(z)
