"""SepLLM attention for transformers' stock GPT-NeoX and Llama (copied next to exported weights).

Loaded with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. The
stock model is subclassed; only the attention function changes: key j is visible to
query i iff j <= i and (j < a or token j is a separator or i - j < n), with n per
layer (None: dense). The `sepllm` block of config.json holds kind, separator ids,
init tokens, windows and the fixed interval. Prefill and `generate` (greedy,
sampling; no beam reordering, no padded batches) apply the same mask.
"""
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM


def sepllm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sepllm_keep=None,
                     sepllm_positions=None, **kwargs):
    n = module.config.sepllm["windows"][module.layer_idx]
    kpos = torch.arange(key.shape[2], device=query.device)
    qpos = sepllm_positions[:, :, None]  # [1 or b, s, 1]
    mask = kpos <= qpos
    if n is not None:
        mask = mask & (sepllm_keep[:, None, : key.shape[2]] | (qpos - kpos < n))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("sepllm", sepllm_attention)


class _SepLLMMixin:
    """Tracks which tokens stay visible (initial tokens, separators) across generate steps."""

    def _setup_sepllm(self):
        self.config._attn_implementation = "sepllm"
        self._sepllm_keep = None

    def forward(self, input_ids=None, past_key_values=None, **kwargs):
        s = self.config.sepllm
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if seen == 0:
            self._sepllm_keep = None
        pos = torch.arange(seen, seen + input_ids.shape[1], device=input_ids.device)
        if s["kind"] == "sepllm":
            sep = torch.isin(input_ids, torch.tensor(s["separator_ids"], device=input_ids.device))
        elif s["kind"] == "fixed_interval":
            sep = ((pos + 1) % s["fixed_interval"] == 0).expand_as(input_ids)
        else:
            sep = torch.zeros_like(input_ids, dtype=torch.bool)
        keep = sep | (pos < s["init_tokens"])
        self._sepllm_keep = keep if self._sepllm_keep is None else torch.cat([self._sepllm_keep, keep], 1)
        return super().forward(input_ids=input_ids, past_key_values=past_key_values,
                               sepllm_keep=self._sepllm_keep, sepllm_positions=pos[None, :], **kwargs)


class SepLLMLlamaConfig(LlamaConfig):
    model_type = "sepllm_llama"


class SepLLMLlamaForCausalLM(_SepLLMMixin, LlamaForCausalLM):
    config_class = SepLLMLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self._setup_sepllm()


class SepLLMGPTNeoXConfig(GPTNeoXConfig):
    model_type = "sepllm_gpt_neox"


class SepLLMGPTNeoXForCausalLM(_SepLLMMixin, GPTNeoXForCausalLM):
    config_class = SepLLMGPTNeoXConfig

    def __init__(self, config):
        super().__init__(config)
        self._setup_sepllm()
