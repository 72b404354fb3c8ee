"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward pass.

Each round the draft decodes k tokens one at a time; the target runs once over its pending token and the k
proposals, which gives its distribution at all k + 1 positions. Greedy keeps the proposals up to the first
one that is not the target's argmax, then adds the target's own token there (or after the last proposal):
the output is the target's greedy output. Sampling uses the rejection rule of Leviathan et al. and Chen et
al. (2023): proposal x with draft probability q(x) is kept with probability min(1, p(x) / q(x)); at the first
rejection the next token is drawn from norm(max(0, p - q)); if all k are kept, one more from p. Every token
then follows the target's own sampling distribution exactly, with temperature, top-k and top-p applied the
same way to both models (`filtered_probs`).

Both KV caches mark their length before a round and roll back what the round took back (inference/cache.py,
inference/sep_cache.py), with or without SepLLM eviction and with the bounded SepCache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .device_rounds import DeviceRounds
from .generate import feed, filtered_probs, make_cache
from .options import DecodeOptions
from .static_cache import StaticKVCache


def accept_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The chance to keep a proposal the draft drew with probability q and the target gives p."""
    return (p / q).clamp(max=1.0)


@dataclass
class Stats:
    new_tokens: int = 0
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0  # forward passes of the target after the prompt (one per round)
    draft_passes: int = 0
    seconds: float = 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.proposed)

    def line(self) -> str:
        return (
            f"acceptance {self.acceptance:.1%} ({self.accepted}/{self.proposed} proposals) | "
            f"{self.new_tokens / max(1, self.target_passes):.2f} tokens per target pass | "
            f"{self.new_tokens / max(self.seconds, 1e-9):.1f} tokens/s"
        )


def check_pair(target, draft) -> None:
    """The two models must share the token ids: same vocabulary size, and a model a draft can roll back."""
    vt, vd = target.cfg.model.vocab_size, draft.cfg.model.vocab_size
    if vt != vd:
        raise ValueError(
            f"the draft's vocabulary ({vd} tokens) differs from the target's ({vt}): speculative "
            "decoding compares token ids. Fix: train the draft with the target's tokenizer "
            "(data.tokenizer) and leave model.vocab_size to it, or set it to the target's"
        )
    for name, m in (("target", target), ("draft", draft)):
        if m.cfg.model.subsampled:
            fix = (
                "decode it alone (drop --draft)"
                if name == "target"
                else "drop --draft, or use a draft without model.structure"
            )
            raise ValueError(
                f"the {name} is a SUBLLM model (model.structure subsamples): its level caches do not "
                f"roll back, so it cannot take part in speculative decoding. Fix: {fix}"
            )


# one message for `generate --draft` (refused before the draft loads) and for callers of the function
NO_PREFILL_CHUNK = (
    "--prefill-chunk applies to plain decoding; speculative decoding (--draft) feeds the prompt at "
    "once. Fix: drop one of them"
)


@torch.no_grad()
def speculative_generate(
    target,
    draft,
    prompt: torch.Tensor,
    max_new_tokens: int,
    opts: DecodeOptions | None = None,
    *,
    accept=accept_probability,
):
    """prompt [1, s] -> ([1, s + new] token ids, Stats). Caches and `cuda_graphs` as in `generate`
    (`opts.draft_cache` defaults to `opts.cache`). Greedy decoding with static caches (or graphs) runs each
    round as device work (inference/device_rounds.py) unless `opts.device_rounds` is False (the host loop
    below, which sampling and the other caches use). `accept(p, q)` is the keep probability of a proposal (a
    parameter so a test can break it)."""
    o = opts or DecodeOptions()
    greedy, draft_tokens, positions, eod_id = o.greedy, o.draft_tokens, o.positions, o.eod_id
    if prompt.shape[0] != 1:
        raise ValueError(
            f"speculative decoding runs one sequence at a time (batch 1); got a batch of "
            f"{prompt.shape[0]}. Fix: decode the prompts one by one"
        )
    if positions != "original":
        raise ValueError(
            f"--cache-positions {positions} (positions={positions!r}, StreamingLLM's shift) rotates "
            "a chunk by the slots at its start, so the target's check of k + 1 tokens would not be "
            "what one-token steps give. Fix: use --cache-positions original (positions='original')"
        )
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens={draft_tokens}: propose at least 1 token per round")
    if o.prefill_chunk:
        raise ValueError(NO_PREFILL_CHUNK)
    check_pair(target, draft)
    # one model keeps one graphed cache: the two would share it
    if o.cuda_graphs and draft is target:
        raise ValueError(
            "the draft is the target model itself, and with CUDA graphs both would decode through "
            "one cache. Fix: pass a separate (smaller) draft model"
        )
    bounded = {"sep", "streaming"} & {o.cache, o.draft_cache or o.cache}
    if o.cuda_graphs and bounded:
        raise ValueError(
            f"with CUDA graphs the {bounded.pop()} cache is the fixed-shape SepCache, which keeps no "
            "copies to roll rejected tokens back to. Fix: drop --cuda-graphs (SepCache rolls back), or "
            "use the full or static cache"
        )
    target.eval(), draft.eval()
    caches = []
    for name, m, kind, flag in (
        ("target", target, o.cache, "--cache"),
        ("draft", draft, o.draft_cache or o.cache, "--draft-cache"),
    ):
        try:
            caches.append(
                make_cache(
                    m,
                    kind,
                    o.cache_sizes,
                    positions,
                    o.evict,
                    cuda_graphs=o.cuda_graphs,
                    capacity=prompt.shape[1] + max_new_tokens + draft_tokens,
                )
            )
        except ValueError as e:
            raise ValueError(f"the {name}'s KV cache ({flag} {kind}): {e}") from None
    tkv, dkv = caches
    gen = torch.Generator(device=prompt.device).manual_seed(o.seed)
    stats, start = Stats(), time.perf_counter()
    # both caches hold everything but the last token, which each round feeds
    if prompt.shape[1] > 1:
        feed(target, tkv, prompt[:, :-1])
        feed(draft, dkv, prompt[:, :-1])
    if (
        o.device_rounds
        and greedy
        and isinstance(tkv, StaticKVCache)
        and isinstance(dkv, StaticKVCache)
        and prompt.shape[1] > 1
    ):
        out = greedy_rounds_on_device(
            target,
            draft,
            tkv,
            dkv,
            prompt,
            max_new_tokens,
            draft_tokens,
            eod_id,
            o.cuda_graphs,
            stats,
        )
        return out, finish(out, prompt, stats, start)
    out = prompt

    def choose(probs_or_logits):
        if greedy:
            return probs_or_logits.argmax(-1)
        return torch.multinomial(probs_or_logits, 1, generator=gen)[:, 0]

    def dist(logits):
        return logits.float() if greedy else filtered_probs(logits, o.temperature, o.top_k, o.top_p)

    while out.shape[1] - prompt.shape[1] < max_new_tokens:
        # no proposals past the end
        k = min(draft_tokens, max_new_tokens - (out.shape[1] - prompt.shape[1]))
        dkv.mark()
        inp, proposals, q = out[:, dkv.length :], [], []
        for _ in range(k):  # the draft proposes k tokens; the last is not fed to it
            d = dist(feed(draft, dkv, inp)[:, -1])
            x = choose(d)
            proposals.append(x)
            q.append(d)
            inp = x[:, None]
        stats.draft_passes += k
        tkv.mark()
        # pending token + proposals
        chunk = torch.cat([out[:, tkv.length :], torch.stack(proposals, 1)], 1)
        p = dist(feed(target, tkv, chunk)[0])  # [k + 1, vocab]
        stats.target_passes += 1
        drafted = torch.cat(proposals)  # [k]
        if greedy:
            match = (p[:-1].argmax(-1) == drafted).long()
            n = int(match.cumprod(0).sum())
            nxt = p[n].argmax()
        else:
            q = torch.cat(q)  # [k, vocab]
            rows = torch.arange(k, device=p.device)
            keep = torch.rand(k, generator=gen, device=p.device) < accept(
                p[rows, drafted], q[rows, drafted]
            )
            n = int(keep.long().cumprod(0).sum())
            if n < k:  # the first rejection: draw from what p has beyond q
                residual = (p[n] - q[n]).clamp(min=0)
                # p == q: the rejection had chance 0
                residual = residual if residual.sum() > 0 else p[n]
                nxt = torch.multinomial(residual / residual.sum(), 1, generator=gen)[0]
            else:
                nxt = torch.multinomial(p[k], 1, generator=gen)[0]
        stats.rounds += 1
        stats.proposed += k
        stats.accepted += n
        new = torch.cat([drafted[:n], nxt[None]])[None]
        tkv.rollback(tkv.length - (k - n))  # keep the pending token and the n kept proposals
        dkv.rollback(min(dkv.length, out.shape[1] + n))  # the draft fed proposals up to k - 1
        if eod_id is not None and bool((new == eod_id).any()):
            new = new[:, : int((new[0] == eod_id).nonzero()[0]) + 1]
            out = torch.cat([out, new], 1)
            break
        out = torch.cat([out, new], 1)
    out = out[:, : prompt.shape[1] + max_new_tokens]
    return out, finish(out, prompt, stats, start)


def finish(out, prompt, stats: Stats, start: float) -> Stats:
    if prompt.is_cuda:
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = out.shape[1] - prompt.shape[1]
    return stats


def greedy_rounds_on_device(
    target, draft, tkv, dkv, prompt, max_new_tokens, k, eod_id, graphed, stats
):
    """Greedy decoding with static caches: each round one device-side step (inference/device_rounds.py; one
    CUDA graph with `graphed`, kept with the target's cache for later decodes). The host reads the output's
    length after each round."""
    rounds = tkv.rounds.get(k)
    if rounds is None or rounds.dkv is not dkv or rounds.draft is not draft:
        rounds = tkv.rounds[k] = DeviceRounds(target, draft, tkv, dkv, k, graphed)
    rounds.start(prompt, max_new_tokens, eod_id)
    end, n, found = prompt.shape[1] + max_new_tokens, prompt.shape[1], 0
    while n < end and not found:
        before = n
        rounds.replay()
        stats.rounds += 1
        n, found = rounds.state.tolist()
    if stats.rounds:  # counted as the host loop counts: its last round proposes only up to the end
        last, kept = min(k, end - before), n - before - 1
        stats.proposed = stats.draft_passes = k * (stats.rounds - 1) + last
        stats.target_passes = stats.rounds
        stats.accepted = int(rounds.accepted) - kept + min(kept, last)
    out = rounds.out[:, : min(n, end)].clone()
    if found:  # stop after the first eod_id among the new tokens, as target-only decoding does
        new = out[0, prompt.shape[1] :]
        out = out[:, : prompt.shape[1] + int((new == eod_id).nonzero()[0]) + 1]
    # what both caches hold for certain (the last token is pending)
    tkv.length = dkv.length = out.shape[1] - 1
    return out
