"""SUBLLM for transformers' stock Llama (copied next to the weights by `megatron-sep export-hf`).

Loaded with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. The stock decoder layers
run in the order of `config.subllm["structure"]` (SUBLLM's notation: T a layer, ( a learned
downsampling, ) upsampling + bypass), as megatron_sep/model/subllm.py does at inference:
- each ( keeps the tokens whose score (a linear scorer) is positive, in order, at their own positions;
  rows that keep fewer are padded at the end, where causal attention hides them from real tokens;
- each ) writes w * y + (1 - w) * x back at the kept positions (w: the score clamped to [0, 1]) and mixes
  with the learned per-channel bypass: out = x + (u - x) * b.
Inference only, dense causal attention (sdpa), no KV cache: `generate` recomputes the sequence each step
(config.use_cache is false). Padding masks are not supported.
"""

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import BaseModelOutputWithPast


class SubLLMLlamaConfig(LlamaConfig):
    model_type = "subllm_llama"


def _kept(scores):
    """(index [b, k] ascending, padded with the last position; weight [b, k], 0 for padding; valid)."""
    keep = scores > 0
    b, s = scores.shape
    pos = torch.arange(s, device=scores.device).expand(b, s)
    index = torch.where(keep, pos, pos + s).sort(dim=1).values[:, : max(1, int(keep.sum(1).max()))]
    valid = index < s
    index = torch.where(valid, index, torch.full_like(index, s - 1))
    return index, torch.gather(scores.clamp(0.0, 1.0), 1, index) * valid, valid


def _gather(x, index):
    return torch.gather(x, 1, index[..., None].expand(*index.shape, x.shape[-1]))


class SubLLMLlamaModel(LlamaModel):
    config_class = SubLLMLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.structure = list(config.subllm["structure"])
        levels = self.structure.count("(")
        self.down = nn.ModuleList(
            nn.Linear(config.hidden_size, 1, bias=False) for _ in range(levels)
        )
        self.bypass = nn.ParameterList(
            nn.Parameter(torch.full((config.hidden_size,), 0.5)) for _ in range(levels)
        )

    def _layer(self, i, h, pos):
        out = self.layers[i](
            h, attention_mask=None, position_ids=pos, position_embeddings=self.rotary_emb(h, pos)
        )
        return out[0] if isinstance(out, tuple) else out

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "this SUBLLM export does not take padded batches. Fix: rows of equal length, no padding"
            )
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = h.shape[:2]
        pos = (
            torch.arange(s, device=h.device)[None].expand(b, s)
            if position_ids is None
            else position_ids.expand(b, s)
        )
        stack, layer, level = [], 0, 0
        for c in self.structure:
            if c == "T":
                h = self._layer(layer, h, pos)
                layer += 1
            elif c == "(":
                index, w, valid = _kept(self.down[level](h).squeeze(-1).float())
                stack.append((h, pos, index, w, valid, level))
                level += 1
                h, pos = _gather(h, index), torch.gather(pos, 1, index)
            else:
                x, pos, index, w, valid, lv = stack.pop()
                mixed = w[..., None].to(h.dtype) * h + (1 - w[..., None].to(h.dtype)) * _gather(
                    x, index
                )
                n = x.shape[1]
                # padding writes to a spare row
                spare = torch.where(valid, index, torch.full_like(index, n))
                u = torch.cat([x, x.new_zeros(b, 1, x.shape[-1])], 1)
                u = u.scatter(1, spare[..., None].expand_as(mixed), mixed)[:, :n]
                h = x + (u - x) * self.bypass[lv].to(x.dtype)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), past_key_values=None)


class SubLLMLlamaForCausalLM(LlamaForCausalLM):
    config_class = SubLLMLlamaConfig

    def __init__(self, config):
        config._attn_implementation = (
            "sdpa"  # causal from attention_mask=None, over each level's sequence
        )
        super().__init__(config)
        self.model = SubLLMLlamaModel(config)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {
            "input_ids": input_ids,
            "use_cache": False,
        }  # no KV cache: every step sees the whole sequence
