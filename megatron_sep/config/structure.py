"""SUBLLM's structure string (model.structure): parsed and checked here, built in model/subllm.py."""
from __future__ import annotations


def parse_structure(structure: str, num_layers: int) -> list[str]:
    """The structure as a list of 'T', '(' and ')'; ValueError names the first problem."""
    chars = list(structure.replace(" ", ""))
    bad = sorted(set(chars) - set("T()"))
    if bad:
        raise ValueError(f"holds {bad}: only T (a block), ( (downsample) and ) (upsample + bypass) are allowed")
    depth = 0
    for i, c in enumerate(chars):
        depth += (c == "(") - (c == ")")
        if depth < 0:
            raise ValueError(f"closes a level at character {i} that was never opened")
        if c == ")" and chars[i - 1] == "(":
            raise ValueError(f"has an empty level () at character {i - 1}: put at least one T inside")
    if depth:
        raise ValueError(f"leaves {depth} level(s) open: add the matching )")
    blocks = chars.count("T")
    if blocks != num_layers:
        raise ValueError(f"has {blocks} blocks (T) but model.num_layers={num_layers}")
    return chars


def levels(chars: list[str]) -> int:
    return chars.count("(")


def depth_of_levels(chars: list[str]) -> list[int]:
    """For each '(' in order, its nesting depth (1 = outermost)."""
    out, depth = [], 0
    for c in chars:
        if c == "(":
            depth += 1
            out.append(depth)
        elif c == ")":
            depth -= 1
    return out
