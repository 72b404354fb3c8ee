"""Greedy and sampled generation from a project model, with a SepLLM-aware KV cache."""

from __future__ import annotations

import torch

from .cache import SepKVCache
from .options import DecodeOptions
from .sep_cache import SepCache
from .static_cache import StaticKVCache


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    opts: DecodeOptions | None = None,
    *,
    output_logits: bool = False,
):
    """prompt [b, s] -> [b, s + new] token ids. Stops early when every row has produced `opts.eod_id`.

    `opts.cache`: "full" (every key the mask can still reach; `evict` drops the others), "sep" (SepCache with
    `cache_sizes` = (initial, separators, window, capacity): bounded memory), "streaming" (SepCache
    without separators: StreamingLLM) or "static" (every key, in buffers sized for prompt + new tokens).
    `cuda_graphs` replays each decode step as a CUDA graph (the static cache; "full" switches to it).
    `prefill_chunk` > 0 feeds the prompt that many tokens at a time.
    With output_logits, also returns each step's logits [b, new, vocab] (fp32, before sampling).
    """
    o = opts or DecodeOptions()
    model.eval()
    kv = make_cache(
        model,
        o.cache,
        o.cache_sizes,
        o.positions,
        o.evict,
        capacity=prompt.shape[1] + max_new_tokens,
        cuda_graphs=o.cuda_graphs,
        batch=prompt.shape[0],
    )
    gen = torch.Generator(device=prompt.device).manual_seed(o.seed)
    # one buffer for the ids: a cat per step would copy them all each step (quadratic in a long stream)
    out = prompt.new_empty(prompt.shape[0], prompt.shape[1] + max_new_tokens)
    out[:, : prompt.shape[1]] = prompt
    n = prompt.shape[1]
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    steps = []
    chunk = o.prefill_chunk if o.prefill_chunk > 0 else prompt.shape[1]
    for start in range(0, prompt.shape[1] - chunk, chunk):  # all but the prompt's last chunk
        feed(model, kv, prompt[:, start : start + chunk])
    step_input = prompt[:, (prompt.shape[1] - 1) // chunk * chunk :]
    for _ in range(max_new_tokens):
        logits = feed(model, kv, step_input)[:, -1].float()
        # kept only when asked: [b, vocab] per token would outgrow a bounded cache
        if output_logits:
            steps.append(logits)
        if o.greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = sample(logits / max(o.temperature, 1e-6), o.top_k, o.top_p, gen)
        if o.eod_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, o.eod_id), nxt)
            done |= nxt == o.eod_id
        out[:, n] = nxt
        n += 1
        step_input = nxt[:, None]
        if o.eod_id is not None and done.all():
            break
    return (out[:, :n], torch.stack(steps, 1)) if output_logits else out[:, :n]


def feed(model, kv, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits for the next tokens [b, s] of a stream, through (and into) the KV cache `kv`."""
    if getattr(kv, "graphs", None) is not None:
        return kv.graphs(tokens)
    return model(tokens, position_ids=kv.begin(tokens), cache=kv)


def make_cache(
    model,
    kind: str,
    sizes=(4, 64, 256, 512),
    positions: str = "original",
    evict: bool = False,
    capacity: int | None = None,
    cuda_graphs: bool = False,
    batch: int = 1,
    fixed_shape: bool = False,
    chunk: int = 1,
):
    """The KV cache generation and streaming evaluation decode with (see `generate`); `capacity`: the tokens
    a static cache must hold. A bounded cache (sep, streaming) with `cuda_graphs` or `fixed_shape` is the
    fixed-shape SepCache, sized for steps of `chunk` tokens."""
    if model.cfg.model.arch == "dlcm":
        if cuda_graphs:
            raise ValueError(
                "a DLCM model decodes without CUDA graphs (its concepts change the shapes of each step). "
                "Fix: drop --cuda-graphs"
            )
        if kind != "full":
            raise ValueError(
                f"a DLCM model decodes with the full cache only, not {kind} (its concepts grow with "
                "the stream). Fix: --cache full"
            )
        from .dlcm_cache import DLCMCache

        return DLCMCache(model.cfg, model.sep_ids, evict=evict)
    if cuda_graphs:
        if kind not in ("full", "static", "sep", "streaming") or evict:
            what = "--evict" if evict else f"the {kind} cache"
            raise ValueError(
                f"CUDA graphs replay steps of fixed shape (the static or the bounded caches); {what} "
                "changes the shape as it decodes. Fix: drop --evict (or --cuda-graphs)"
            )
        if not model.sep_ids.is_cuda:
            raise ValueError(
                "CUDA graphs need the model on a CUDA device. Fix: --device cuda, or drop --cuda-graphs"
            )
    if kind in ("sep", "streaming"):
        a, s, w, c = sizes
        kw = dict(
            init=a,
            seps=0 if kind == "streaming" else s,
            window=w,
            capacity=c,
            positions=positions,
            streaming=kind == "streaming",
        )
        if not (cuda_graphs or fixed_shape):
            return SepCache(model.cfg, model.sep_ids, **kw)
        from .static_sep_cache import StaticSepCache

        kv = StaticSepCache(model.cfg, model.sep_ids, chunk=chunk, **kw)
        if cuda_graphs:
            from .graphs import GraphedChunks

            kv.graphs = GraphedChunks(model, kv)
        return kv
    if cuda_graphs:  # full or static: the static cache, kept with the model
        from .graphs import graphed_cache

        return graphed_cache(model, capacity, batch)
    if kind == "static":
        if evict:
            raise ValueError(
                "the static cache keeps every key (--evict would change its shape). Fix: use --cache "
                "full with --evict, or drop --evict"
            )
        if capacity is None:
            raise ValueError(
                "the static cache needs its capacity: the prompt's tokens plus the new ones"
            )
        return StaticKVCache(model.cfg, model.sep_ids, capacity, batch)
    if kind == "full":
        return SepKVCache(model.cfg, model.sep_ids, evict=evict)
    raise ValueError(f"cache {kind!r} is unknown; use full, sep, streaming or static")


def filtered_probs(
    logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The sampling distribution [n, vocab] of logits [n, vocab]: temperature, then top-k, then top-p
    (the smallest prefix of the sorted probabilities reaching top_p)."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def sample(logits, top_k: int, top_p: float, gen) -> torch.Tensor:
    return torch.multinomial(filtered_probs(logits, 1.0, top_k, top_p), 1, generator=gen)[:, 0]
