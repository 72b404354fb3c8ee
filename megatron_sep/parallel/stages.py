"""Which layers each pipeline chunk holds (read by the layout checks before any process group exists, and by
the pipeline)."""

from __future__ import annotations


def split_layers(num_layers: int, chunks: int, allowed=None) -> list[list[int]]:
    """Contiguous layer ranges per global chunk; leftover layers go to the middle chunks, since the
    first chunk also embeds and the last also runs the head. `allowed[i]`: a chunk may start at layer i
    (SUBLLM: not inside a level); each boundary moves to the nearest allowed one, ValueError if none is."""
    base, extra = divmod(num_layers, chunks)
    order = sorted(range(chunks), key=lambda c: (c in (0, chunks - 1), abs(c - (chunks - 1) / 2)))
    sizes = [base + (1 if c in order[:extra] else 0) for c in range(chunks)]
    starts = [sum(sizes[:c]) for c in range(chunks)]
    if allowed is not None:
        for c in range(1, chunks):
            options = [
                i for i in range(starts[c - 1] + 1, num_layers - (chunks - c) + 1) if allowed[i]
            ]
            if not options:
                raise ValueError(
                    f"no stage boundary after layer {starts[c - 1]} leaves every ( ... ) in one stage"
                )
            starts[c] = min(options, key=lambda i: (abs(i - starts[c]), i))
    return [list(range(a, b)) for a, b in zip(starts, starts[1:] + [num_layers])]
