"""How to decode: one record for `generate` and `speculative_generate`, so the two take the same settings
(a benchmark or test compares them with one record) and a new setting is one field, not a parameter on each."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeOptions:
    """Token choice and KV cache of a decoding loop. The prompt and the number of new tokens are not here:
    they change per call, and one record serves calls of any length. `dataclasses.replace` gives a variant."""

    # token choice: argmax, or temperature, then top-k, then top-p (`generate.filtered_probs`)
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eod_id: int | None = None  # stop once every row has produced it
    # KV cache (`generate.make_cache`): full, sep (SepCache, `cache_sizes` = initial, separators, window,
    # capacity), streaming (StreamingLLM) or static; `positions`: RoPE at stream positions or cache slots
    cache: str = "full"
    cache_sizes: tuple[int, int, int, int] = (4, 64, 256, 512)
    positions: str = "original"
    evict: bool = False  # drop keys no later token can see (the full cache with a sparse mask)
    cuda_graphs: bool = False  # replay each decode step as a CUDA graph (the static cache)
    # plain decoding only: feed the prompt this many tokens at a time (0: at once)
    prefill_chunk: int = 0
    # speculative decoding only: proposals per round, the draft's cache (None: `cache`), and greedy rounds
    # with static caches as device work (False: the host loop)
    draft_tokens: int = 4
    draft_cache: str | None = None
    device_rounds: bool = True
