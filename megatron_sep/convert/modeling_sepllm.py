"""SepLLM attention for transformers' stock GPT-NeoX and Llama (copied next to exported weights).

Loaded with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. The stock model is
subclassed; only the attention function changes: key j is visible to query i iff j <= i and (j < a or
token j is a separator or i - j < n), with n per layer (None: dense). The `sepllm` block of config.json
holds kind, separator ids, init tokens, windows and the fixed interval.

Positions, separator flags and padding of every cached token are kept on the cache object itself, so
prefill, `generate` (greedy or sampling, dynamic or static cache, right-padded batches) and a manual
decoding loop all apply the same mask. Beam search and left padding are not supported.
`SepCache` (below) is the paper's fixed-capacity cache for streaming: pass it to `generate`.
"""

import inspect

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from transformers import (
    AttentionInterface,
    DynamicCache,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

# Tested with `make test-hf` on 4.57.6, 5.0.0, 5.13.1 and 5.24.0. A new major may change the model
# classes this file subclasses, so it is refused until tested.
MIN_TRANSFORMERS, BELOW_TRANSFORMERS = "4.57.0", "6.0.0"
if not Version(MIN_TRANSFORMERS) <= Version(transformers.__version__) < Version(BELOW_TRANSFORMERS):
    raise ImportError(
        f"this SepLLM export supports transformers >={MIN_TRANSFORMERS},<{BELOW_TRANSFORMERS}, but "
        f"transformers {transformers.__version__} is installed. Fix: pip install "
        f"'transformers>={MIN_TRANSFORMERS},<{BELOW_TRANSFORMERS}'"
    )


class SepLLMVisibility:
    """What every key slot is (position, always-kept, real token) and where the queries sit."""

    def __init__(self, kpos, keep, valid, qpos, first_slot, retained=None):
        self.kpos, self.keep, self.valid, self.qpos = kpos, keep, valid, qpos  # [b, T] x3, [b, s]
        self.first_slot = first_slot  # slot of the first query
        self.retained = retained  # SepCache: [b, s, T], the slots each query's step still holds
        self._masks = {}

    def mask(self, window, key_len):
        """[b, 1, s, key_len] bool; slots past the known ones (an unfilled static cache) stay hidden."""
        if window not in self._masks:
            kp, qp = self.kpos[:, None, :], self.qpos[:, :, None]
            slots = torch.arange(kp.shape[-1], device=kp.device)
            qslots = self.first_slot + torch.arange(qp.shape[1], device=kp.device)
            earlier = slots[None, None, :] <= qslots[None, :, None]
            m = self.valid[:, None, :] & earlier & (kp <= qp)
            if window is not None:
                m = m & (self.keep[:, None, :] | (qp - kp < window))
            if self.retained is not None:
                m = m & self.retained
            alone = slots[None, None, :] == qslots[None, :, None]
            m = m | (alone & ~m.any(-1, keepdim=True))  # leading padding sees itself: no NaN
            self._masks[window] = m[:, None]
        m = self._masks[window]
        return F.pad(m, (0, key_len - m.shape[-1])) if key_len > m.shape[-1] else m


def sepllm_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sepllm=None, **kwargs
):
    if sepllm is None:
        raise ValueError(
            "SepLLM attention needs the model's own forward (it tracks separators); call the "
            "ForCausalLM model, not its inner layers"
        )
    mask = sepllm.mask(module.config.sepllm["windows"][module.layer_idx], key.shape[2])
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        scale=scaling,
        dropout_p=dropout if module.training else 0.0,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("sepllm", sepllm_attention)


class _SepLLMMixin:
    def _setup_sepllm(self):
        self.config._attn_implementation = "sepllm"

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ):
        # transformers 5.24 renamed past_key_values to cache; named here so generate's argument check sees both
        given = cache if cache is not None else past_key_values
        if given is not None:
            kwargs[
                "cache"
                if "cache" in inspect.signature(super().forward).parameters
                else "past_key_values"
            ] = given
        if input_ids is None:
            raise ValueError(
                "SepLLM models find separators from token ids. Fix: pass input_ids, not inputs_embeds"
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "SepLLM models build their own attention mask. Fix: pass a 2D padding mask "
                "[batch, past + new tokens] or none"
            )
        # transformers 5.24 renamed it to `cache`
        name = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(name)
        b, s = input_ids.shape
        dev = input_ids.device
        streaming = isinstance(cache, SepCache)
        if streaming and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "SepCache streams rows of equal length. Fix: no padding (batch 1, or equal rows)"
            )
        seen = (
            cache.sepllm_seen
            if streaming
            else int(cache.get_seq_length())
            if cache is not None
            else 0
        )
        past = self._past_state(cache, int(cache.get_seq_length()) if streaming else seen, b, dev)
        if attention_mask is not None:
            # positions count real tokens; a padding slot takes the last real token's id and position, so
            # after right padding the last slot's logits are that token's (what generate reads)
            valid = attention_mask[:, -s:].bool()
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:].to(dev)
            last_real = (
                torch.arange(s, device=dev).expand(b, s).masked_fill(~valid, 0).cummax(1).values
            )
            input_ids = input_ids.gather(1, last_real)
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
            if position_ids is None:
                position_ids = torch.arange(seen, seen + s, device=dev)[None]
            pos = position_ids.to(dev).expand(b, s)
        keep = self._always_kept(input_ids, pos)
        state = [torch.cat([p, n], 1) for p, n in zip(past, (pos, keep, valid))]
        retained = None
        if streaming:  # which slots each query's step holds, and which stay after this call
            sep = self._separators(input_ids, pos)
            sep = sep if cache.sepllm_sep is None else torch.cat([cache.sepllm_sep, sep], 1)
            retained, alive = cache.retention(state[0], sep, pos[0])
            cache.plan_compaction(alive)
        vis = SepLLMVisibility(*state, qpos=pos, first_slot=past[0].shape[1], retained=retained)
        out = super().forward(input_ids=input_ids, position_ids=pos, sepllm=vis, **kwargs)
        filled = kwargs.get(name) if kwargs.get(name) is not None else _output_cache(out)
        if streaming:
            idx = cache.sepllm_idx
            cache.sepllm_sep = sep.gather(1, idx)
            state = [t.gather(1, idx) for t in state]
            cache.sepllm_seen = seen + s
            cache.sepllm_idx = None
        if filled is not None:
            filled.sepllm_state = state
        return out

    def _separators(self, input_ids, pos):
        s = self.config.sepllm
        if s["kind"] == "sepllm":
            return torch.isin(input_ids, torch.tensor(s["separator_ids"], device=input_ids.device))
        if s["kind"] == "fixed_interval":
            return (pos + 1) % s["fixed_interval"] == 0
        return torch.zeros_like(input_ids, dtype=torch.bool)

    def _always_kept(self, input_ids, pos):
        return self._separators(input_ids, pos) | (pos < self.config.sepllm["init_tokens"])

    @staticmethod
    def _past_state(cache, seen, b, device):
        if seen == 0:
            return [
                torch.zeros(b, 0, dtype=t, device=device)
                for t in (torch.long, torch.bool, torch.bool)
            ]
        state = getattr(cache, "sepllm_state", None)
        if state is None or state[0].shape[1] < seen:
            raise ValueError(
                "this cache holds tokens that this SepLLM model did not process. Fix: pass the cache "
                "returned by this model, or none"
            )
        if state[0].shape[0] != b:
            raise ValueError(
                "the batch changed between calls (beam search reorders the cache). Fix: use greedy "
                "or sampling"
            )
        return [t[:, :seen] for t in state]  # a cropped cache (assisted decoding) drops the tail

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        mask = kwargs.get("attention_mask")
        # keep the 2D padding mask: static caches would turn it into a 4D causal one
        if mask is not None:
            inputs["attention_mask"] = mask
        return inputs


class SepCache(DynamicCache):
    """The SepLLM paper's fixed-capacity KV cache: `generate(ids, past_key_values=SepCache(4, 64, 256, 512))`
    streams in bounded memory. Per row: the first `init` tokens, up to `seps` separators (the newest), the
    past window and the latest `window` tokens; when a row holds `capacity` entries, its past window is
    compressed (separators kept, other tokens dropped). Attention runs over the retained keys under the
    model's mask; each query of a multi-token call sees the keys retained at its own step. Rotary positions
    are stream positions. The same rule as megatron_sep.inference.SepCache (tested to give the same tokens)."""

    def __init__(
        self, init: int = 4, seps: int = 64, window: int = 256, capacity: int = 512, **kwargs
    ):
        super().__init__(**kwargs)
        if min(init, seps) < 0 or window < 1 or init + seps + window >= capacity:
            raise ValueError(
                f"SepCache({init}, {seps}, {window}, {capacity}): need init, seps >= 0, window >= 1 and "
                "init + seps + window < capacity. Fix: e.g. SepCache(4, 64, 256, 512)"
            )
        self.sepllm_sizes = (init, seps, window, capacity)
        self.sepllm_seen, self.sepllm_sep, self.sepllm_idx = 0, None, None

    def retention(self, pos, sep, qpos):
        """[b, s, T]: the columns retained at each query's step; [b, T]: those alive after the call."""
        a, n_seps, w, c = self.sepllm_sizes
        b, t = pos.shape
        s = qpos.numel()
        t0 = int(qpos[0])
        alive = torch.ones(b, t, dtype=torch.bool, device=pos.device)
        retained = alive[:, None, :].expand(b, s, t).clone()
        # the step reaching capacity
        fire = torch.full((b,), t0 + (c - (t - s)) - 1, device=pos.device)
        while True:
            now = fire <= t0 + s - 1
            if not bool(now.any()):
                return retained, alive
            tau = torch.where(now, fire, torch.full_like(fire, -1))[:, None]
            seen = alive & (pos <= tau)
            local = pos > tau - w
            cand = seen & sep & (pos >= a) & ~local
            newer = cand.flip(1).cumsum(1).flip(1) - cand.long()
            kept = seen & ((pos < a) | local | (cand & (newer < n_seps)))
            drop = seen & ~kept & now[:, None]
            alive &= ~drop
            retained &= ~(drop[:, None, :] & (qpos[None, :, None] > tau[:, :, None]))
            fire = torch.where(now, tau[:, 0] + (c - kept.sum(1)), fire)

    def plan_compaction(self, alive):
        """The columns every layer keeps after this call (rows padded to one length: equal rows only)."""
        order = torch.sort((~alive).to(torch.int8), dim=1, stable=True).indices
        self.sepllm_idx = order[:, : int(alive.sum(1).max())]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.sepllm_idx is not None:  # attend over everything, keep only the retained columns
            idx = self.sepllm_idx[:, None, :, None].expand(
                keys.shape[0], keys.shape[1], -1, keys.shape[3]
            )
            layer = self.layers[layer_idx]
            layer.keys, layer.values = keys.gather(2, idx), values.gather(2, idx)
        return keys, values


def _output_cache(out):
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return None


class SepLLMLlamaConfig(LlamaConfig):
    model_type = "sepllm_llama"


class SepLLMLlamaForCausalLM(_SepLLMMixin, LlamaForCausalLM):
    config_class = SepLLMLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self._setup_sepllm()


class SepLLMGPTNeoXConfig(GPTNeoXConfig):
    model_type = "sepllm_gpt_neox"


def _head_renamed(keys):
    """GPT-NeoX's output head is `embed_out` before transformers 5.14 and `lm_head` after; exports say lm_head."""
    if isinstance(keys, dict):
        return {k.replace("embed_out", "lm_head"): v for k, v in keys.items()}
    return [k.replace("embed_out", "lm_head") for k in keys] if keys else keys


class SepLLMGPTNeoXForCausalLM(_SepLLMMixin, GPTNeoXForCausalLM):
    config_class = SepLLMGPTNeoXConfig
    _tied_weights_keys = _head_renamed(GPTNeoXForCausalLM._tied_weights_keys)

    def __init__(self, config):
        super().__init__(config)
        # older transformers: one head module, named as the export names it
        if "embed_out" in self._modules:
            self.lm_head = self._modules.pop("embed_out")
        self._setup_sepllm()

    @property
    def embed_out(self):  # what older transformers' forward and get_output_embeddings read
        return (
            self._modules["lm_head"] if "lm_head" in self._modules else self._modules["embed_out"]
        )
