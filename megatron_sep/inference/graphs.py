"""Decode steps replayed as CUDA graphs: one graph per number of tokens a step feeds.

At batch 1 a small model's decode step is bound by host time (a few hundred kernel launches from Python),
not by the GPU. A graph launches them all at once. The step runs through a StaticKVCache, so its shapes and
buffers stay fixed; a replay copies the tokens and positions into the graph's input buffers first.

Capturing costs a few eager steps, so the cache and its graphs stay with the model (`graphed_cache`) and the
next decode of a similar length replays them: only the cache's length is reset, as positions not yet written
in a decode lie in its queries' future.
"""

from __future__ import annotations

import torch

from .static_cache import StaticKVCache


class Kept(dict):
    """The graphs kept on a model: a copy or a pickle of the model starts without them (graphs do not copy)."""

    def __deepcopy__(self, memo):
        return Kept()

    def __reduce__(self):
        return Kept, ()


def graphed_cache(model, capacity: int, batch: int) -> StaticKVCache:
    """The model's static cache for `capacity` tokens (rounded up to a power of two, at least 256, so decodes
    of similar lengths share one), its graphs kept from earlier decodes, emptied."""
    capacity = max(256, 1 << (capacity - 1).bit_length())
    key = (capacity, batch, next(model.parameters()).dtype, model.sep_ids.device)
    # a plain attribute: not state, not a submodule
    kept = model.__dict__.setdefault("_decode_graphs", Kept())
    if key not in kept:
        kv = StaticKVCache(model.cfg, model.sep_ids, capacity, batch)
        kv.graphs = GraphedSteps(model, kv)
        kept[key] = kv
    kv = kept[key]
    kv.length, kv.hold = 0, None
    return kv


class GraphedSteps:
    def __init__(self, model, cache: StaticKVCache, step_tokens: int = 16, max_tokens: int = 1024):
        self.model, self.cache = model, cache
        self.step_tokens, self.max_tokens = step_tokens, max_tokens
        self.graphs = {}  # tokens per step -> (graph, tokens buffer, positions buffer, logits)
        self.seen = set()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits [b, s, vocab] of the next tokens [b, s]. Decode steps (up to step_tokens) are captured
        at once; longer ones (prompts) at their second sighting, up to max_tokens: capturing a shape used
        once costs three eager steps and saves nothing."""
        s, c = tokens.shape[1], self.cache
        if s not in self.graphs:
            if s > self.max_tokens or (s > self.step_tokens and s not in self.seen):
                self.seen.add(s)
                return self._step(tokens, c.advance(s))
            self.graphs[s] = self._capture(tokens)
        graph, tok, pos, logits = self.graphs[s]
        tok.copy_(tokens)
        pos.copy_(c.advance(s))
        graph.replay()
        return logits.clone()  # the next replay overwrites the graph's output

    def _step(self, tokens, pos):
        return self.cache.step(self.model, tokens, pos)

    def _capture(self, tokens):
        """Warm-up and capture both write the step's own keys at its own positions, which the replay writes
        again."""
        c = self.cache
        tok, pos = tokens.clone(), c.slots[c.length : c.length + tokens.shape[1]].clone()
        graph, logits = capture(lambda: self._step(tok, pos))
        return graph, tok, pos, logits


def capture(run, undo=lambda: None):
    """run() captured as a CUDA graph, after two warm-up calls on a side stream (Triton compiles, allocations),
    each followed by undo(). Returns (graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
            undo()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


class GraphedChunks:
    """Steps of one fixed size through a StaticSepCache, replayed as one CUDA graph each (streaming, or
    one-token decoding with a bounded cache). A step of another size runs eagerly on the same buffers.

    The cache's state changes with every step, so capture saves it after a first eager step, runs the
    warm-up steps, and puts it back before the replay that counts."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.graphs = {}  # tokens per step -> (graph, tokens buffer, logits)

    def _step(self, tokens):
        return self.model(tokens, position_ids=self.cache.begin(tokens), cache=self.cache)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        s, c = tokens.shape[1], self.cache
        if s not in self.graphs:
            if c.pos is None or s > c.chunk:  # the buffers come with the first step
                return self._step(tokens)
            tok = tokens.clone()
            saved = [t.clone() for t in c.state()]
            length = c.length

            def undo():
                for t, v in zip(c.state(), saved):
                    t.copy_(v)
                c.length = length

            graph, logits = capture(lambda: self._step(tok), undo)
            c.length = length  # capture ran the step's host part once more
            self.graphs[s] = graph, tok, logits
        graph, tok, logits = self.graphs[s]
        tok.copy_(tokens)
        graph.replay()
        c.length += s
        return logits.clone()  # the next replay overwrites the graph's output
