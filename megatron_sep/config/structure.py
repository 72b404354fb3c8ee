"""SUBLLM's structure string (model.structure): parsed and checked here, built in model/subllm.py."""

from __future__ import annotations


def parse_structure(structure: str, num_layers: int) -> list[str]:
    """The structure as a list of 'T', '(' and ')'; ValueError names the first problem."""
    chars = list(structure.replace(" ", ""))
    bad = sorted(set(chars) - set("T()"))
    if bad:
        raise ValueError(
            f"holds {bad}: only T (a block), ( (downsample) and ) (upsample + bypass) are allowed"
        )
    depth = 0
    for i, c in enumerate(chars):
        depth += (c == "(") - (c == ")")
        if depth < 0:
            raise ValueError(f"closes a level at character {i} that was never opened")
        if c == ")" and chars[i - 1] == "(":
            raise ValueError(
                f"has an empty level () at character {i - 1}: put at least one T inside"
            )
    if depth:
        raise ValueError(f"leaves {depth} level(s) open: add the matching )")
    blocks = chars.count("T")
    if blocks != num_layers:
        raise ValueError(f"has {blocks} blocks (T) but model.num_layers={num_layers}")
    return chars


def levels(chars: list[str]) -> int:
    return chars.count("(")


def block_shares(chars: list[str], keeps: list[float]) -> list[float]:
    """Each block's share of the sequence in training: the product of the keeps of the levels around it."""
    shares, stack, level = [], [1.0], 0
    for c in chars:
        if c == "T":
            shares.append(stack[-1])
        elif c == "(":
            stack.append(stack[-1] * keeps[level])
            level += 1
        else:
            stack.pop()
    return shares


def skip_level(chars: list[str], start: int) -> int:
    """The index of the ) matching the ( at start."""
    depth = 0
    for i in range(start, len(chars)):
        depth += (chars[i] == "(") - (chars[i] == ")")
        if depth == 0:
            return i
    raise ValueError("unbalanced structure")


def cuts(chars: list[str]) -> list[tuple[int, int]]:
    """For each block i, where a pipeline chunk starting at block i begins in `chars` (after the ) that close
    levels behind block i-1, before the ( that open levels for block i), and how many levels are open there.
    A chunk may start at block i only where that count is 0, so that each ( ... ) sits inside one stage."""
    out, depth, i = [], 0, 0
    while i < len(chars):
        while i < len(chars) and chars[i] == ")":
            depth -= 1
            i += 1
        if i == len(chars):  # the structure ends with levels closing after the last block
            break
        out.append((i, depth))
        while chars[i] == "(":
            depth += 1
            i += 1
        i += 1  # the T
    return out


def stage_starts(chars: list[str]) -> list[bool]:
    return [depth == 0 for _, depth in cuts(chars)]


def chunk_structure(chars: list[str], layers: list[int]) -> tuple[list[str], int]:
    """The part of the structure that runs blocks `layers` (contiguous, starting where no level is open),
    and the index of its first ( among all of them."""
    at = cuts(chars)
    start = at[layers[0]][0]
    end = at[layers[-1] + 1][0] if layers[-1] + 1 < len(at) else len(chars)
    return chars[start:end], chars[:start].count("(")
