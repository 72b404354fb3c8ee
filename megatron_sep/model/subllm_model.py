"""SUBLLM as a model class (arXiv 2406.06571; the modules and the math are in model/subllm.py): the GPT's
blocks run as `model.structure` says, each ( ... ) on the tokens its scorer keeps."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..config.structure import chunk_structure, parse_structure, skip_level, stage_starts
from .attention import subsample_batch
from .gpt import GPT
from .subllm import Bypass, Downsample, bypass_minimum, gather_seq, pad_selection, upsample


class SubLLM(GPT):
    seq_shards = None  # sequence parallelism (parallel/tensor.py SeqShards): levels select over the whole sequence

    def build_extra(self, m: ModelConfig) -> None:
        self.structure = parse_structure(m.structure, m.num_layers)
        self.down = nn.ModuleList(
            Downsample(m.hidden_size, k, m.subsample_causal) for k in m.level_keeps()
        )
        self.bypass = nn.ModuleList(Bypass(m.hidden_size) for _ in self.down)

    def init_extra(self, m: ModelConfig) -> None:
        for d in self.down:  # scores of about unit size from a unit-size stream
            nn.init.normal_(d.score.weight, std=m.hidden_size**-0.5)

    def run_layers(self, x, position_ids, batch, indices=None, cache=None):
        if indices is None:
            return self.run_structure(x, position_ids, batch, cache, self.structure, 0, 0)
        chars, level = chunk_structure(self.structure, list(indices))
        return self.run_structure(x, position_ids, batch, cache, chars, indices[0], level)

    def stage_starts(self) -> list[bool]:
        """A pipeline stage starts outside every ( ... )."""
        return stage_starts(self.structure)

    def keep_stage_parts(self, chunks: list[list[int]]) -> None:
        """A pipeline stage keeps the scorers and bypasses of the levels in its chunks (names unchanged)."""
        mine = set()
        for layers in chunks:
            chars, first = chunk_structure(self.structure, layers)
            mine.update(range(first, first + chars.count("(")))
        for name in ("down", "bypass"):
            setattr(
                self,
                name,
                nn.ModuleDict({str(i): m for i, m in enumerate(getattr(self, name)) if i in mine}),
            )

    def set_train_step(self, step: int) -> None:
        """The bypass scale's minimum falls over model.bypass_warmup_steps."""
        for m in self.modules():
            if isinstance(m, Bypass):
                m.minimum = bypass_minimum(step, self.cfg.model.bypass_warmup_steps)

    def run_structure(self, x, position_ids, batch, cache, chars, layer, level):
        """The blocks of `chars` (from block `layer` and level `level` on) in order; each ( ... ) runs on the
        tokens its scorer keeps, in order, at their own positions, with their is_sep (model/subllm.py)."""
        if cache is not None and not cache.levels:
            raise ValueError(
                "a model with a subsampling model.structure decodes with the full KV cache only "
                "(cache full), not the bounded SepCache"
            )
        b = x.shape[0]  # x may be a sequence-parallel shard; positions cover the whole sequence
        pos = position_ids.expand(b, -1) if position_ids.dim() == 1 else position_ids
        shards = self.seq_shards if cache is None else None  # sequence parallelism (training only)
        stack, i = [], 0
        while i < len(chars):
            c = chars[i]
            i += 1
            if c == "T":
                x = self._at(self.layers, layer)(x, pos, batch, cache)
                layer += 1
            elif c == "(":
                if shards is not None:  # the level selects over the whole sequence
                    x = shards.gather(x)
                sel = self._at(self.down, level)(x)
                if shards is not None:
                    sel = pad_selection(sel, shards.size, x.shape[1])
                # decoding, nothing kept: the level is a no-op
                if cache is not None and not sel.valid.any():
                    end = skip_level(chars, i - 1)
                    layer += chars[i:end].count("T")
                    level += chars[i - 1 : end].count("(")
                    i = end + 1
                    continue
                stack.append((x, pos, batch, cache, sel, level))
                level += 1
                pos = torch.gather(pos, 1, sel.index)
                if cache is not None:
                    cache = cache.level(level - 1, sel.index, sel.valid)
                else:
                    batch = subsample_batch(self.cfg, batch, sel.index)
                x = gather_seq(x, sel.index)
                if shards is not None:
                    x = shards.split(x)
            else:
                outer, pos, batch, cache, sel, lv = stack.pop()
                if shards is not None:
                    x = shards.gather(x)
                x = self._at(self.bypass, lv)(outer, upsample(outer, x, sel))
                if shards is not None:
                    x = shards.split(x)
        return x
