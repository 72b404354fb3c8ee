"""Greedy speculative rounds that never wait for the host: one CUDA graph per round, on the static caches.

The host loop of inference/speculative.py reads each round's accepted count before it can feed the next one,
so the GPU idles while Python takes the round apart (with graphs, a round is a few milliseconds of GPU work
and that gap was a tenth of it). Here the whole round is device work of fixed shape:

- the draft feeds the last two tokens, at their positions, then proposes k tokens one step at a time. One of
  the two is always already in its cache: rewriting a key at its own position writes the same key, so two
  tokens cover both cases (after a full acceptance the draft has not seen the last proposal);
- the target checks its pending token and the k proposals in one pass and takes its argmax at each position;
- n = the number of leading proposals equal to the target's picks. The target's k + 1 picks are written after
  the output; the first n equal the proposals and the next is the target's own token, so the output grows by
  n + 1 and later rounds overwrite the rest. Positions past the output's length lie in every query's future,
  so what a round wrote there (keys, keep flags, tokens) is masked until it is written again.

The output and its length stay on the device; the host reads the length once a round, to know when to stop.
Without CUDA graphs the same round runs eagerly (`--cache static`), which is how the CPU tests check it.
"""

from __future__ import annotations

import torch

from .graphs import capture
from .static_cache import StaticKVCache


class DeviceRounds:
    def __init__(
        self, target, draft, tkv: StaticKVCache, dkv: StaticKVCache, k: int, graphed: bool
    ):
        self.target, self.draft, self.tkv, self.dkv, self.k, self.graphed = (
            target,
            draft,
            tkv,
            dkv,
            k,
            graphed,
        )
        self.capacity = min(tkv.capacity, dkv.capacity)
        dev = tkv.slots.device
        self.out = torch.zeros(1, self.capacity + 1, dtype=torch.long, device=dev)
        # what the host reads after a round, in one transfer: the output's length, whether eod_id was accepted
        self.state = torch.zeros(2, dtype=torch.long, device=dev)
        self.n, self.found = self.state[0], self.state[1]
        self.accepted = torch.zeros((), dtype=torch.long, device=dev)
        # a buffer: a graph reads it at replay
        self.eod_id = torch.full((), -1, dtype=torch.long, device=dev)
        self.graph = None
        self.two, self.checked = torch.arange(2, device=dev), torch.arange(k + 1, device=dev)

    def start(self, prompt: torch.Tensor, max_new_tokens: int, eod_id: int | None) -> None:
        """The caches already hold every prompt token but the last."""
        s = prompt.shape[1]
        if s < 2 or s + max_new_tokens + self.k > self.capacity:
            raise ValueError(
                f"device rounds need a prompt of 2 tokens or more and caches of prompt + new + "
                f"{self.k} positions; got {s} + {max_new_tokens} for {self.capacity}"
            )
        self.out[:, :s] = prompt
        self.state.copy_(torch.tensor([s, 0]))
        self.accepted.zero_()
        self.eod_id.fill_(-1 if eod_id is None else eod_id)

    def round(self) -> None:
        # 1-d indices: a 0-d one would be read on the host
        n, k, out = (self.n[None], self.k, self.out[0])
        pos = n - 2 + self.two
        x = self.dkv.step(self.draft, out[pos][None], pos)[:, -1].argmax(-1)
        proposals = [x]
        for j in range(1, k):  # the last proposal is not fed to the draft
            x = self.dkv.step(self.draft, x[:, None], n + j - 1)[:, -1].argmax(-1)
            proposals.append(x)
        drafted = torch.cat(proposals)
        pos = n - 1 + self.checked
        picks = self.tkv.step(self.target, torch.cat([out[n - 1], drafted])[None], pos)[0].argmax(
            -1
        )
        kept = (picks[:k] == drafted).long().cumprod(0).sum()
        out.index_copy_(0, n + self.checked, picks)
        self.found |= ((picks == self.eod_id) & (self.checked <= kept)).any().long()
        self.accepted += kept
        self.n += kept + 1

    def replay(self) -> None:
        """One round: with `graphed`, captured at its first call (after two eager warm-up rounds whose effect is
        undone: the length and counts are restored, and what they wrote lies past the output), eager elsewhere."""
        if not self.graphed:
            return self.round()
        if self.graph is None:
            saved = [t.clone() for t in (self.state, self.accepted)]

            def undo():  # each warm-up from the same state: its writes stay within the caches' capacity
                for t, s in zip((self.state, self.accepted), saved):
                    t.copy_(s)

            self.graph, _ = capture(self.round, undo)
        self.graph.replay()
