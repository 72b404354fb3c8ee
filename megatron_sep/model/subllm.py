"""SUBLLM (arXiv 2406.06571): the residual stream is shortened in the middle of the network.

`model.structure` reads as SUBLLM's own config: `T` a transformer block, `(` a learned downsampling
module, `)` upsampling + bypass; e.g. `TTTTT(TTTTT(TTTT)TTTTT)TTTTT`. At each `(` a linear scorer
rates every token; the blocks up to the matching `)` run on the kept tokens only, in their original
order and with their original RoPE positions. At `)` the kept tokens mix back:

    u = w * y + (1 - w) * x   at kept positions,   u = x   at dropped ones
    out = x + (u - x) * b                          (b: a learnable per-channel bypass scale)

x is the stream at `(`, y the inner blocks' output, w the kept token's weight from its score.

Training keeps the top k = ceil(keep * s) scores of each sequence. w is the kept score clamped to [0, 1]
minus the clamped score of the token ranked k places lower (the next-k penalty). It pushes kept
scores up toward 1 and dropped ones down toward 0, and it is the scorer's only gradient path. A
balancer adds gradient so that about `keep` of the scores are positive, at a magnitude of 1 to 4.
The top-k looks at the whole sequence, so whether token t is kept depends on later tokens: a look-ahead
the original training has. `model.subsample_causal: true` keeps the tokens with a positive score
instead, in training as at inference (strictly causal). The bypass scale is held above a minimum that
falls from 0.9 to 0.2 over `model.bypass_warmup_steps`, so early training cannot skip the inner blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

BALANCER_SCALE = 0.04  # the balancer's gradient, relative to the scores' own gradient magnitude
SCORE_ABS = (1.0, 4.0)  # the scores' mean absolute value is kept in this range


class _Balance(torch.autograd.Function):
    """Identity forward; backward adds a gradient that keeps about `keep` of the scores positive and
    their mean absolute value in SCORE_ABS, scaled to the scores' own gradient (after Zipformer's)."""

    @staticmethod
    def forward(ctx, scores, keep: float):
        ctx.save_for_backward(scores)
        ctx.keep = keep
        return scores.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().float().requires_grad_(True)
            mean, rms = x.mean(), x.pow(2).mean().clamp(min=1e-20).sqrt()
            std = (rms**2 - mean**2).clamp(min=1e-20).sqrt()
            lo, hi = (
                _normal_quantile(max(0.01, ctx.keep - 0.05)),
                _normal_quantile(min(0.99, ctx.keep + 0.05)),
            )
            ratio = mean / std  # P(x > 0) of a normal with this ratio is Phi(ratio)
            # mean |x| -> rms of a normal
            abs_lo, abs_hi = (a * math.sqrt(math.pi / 2) for a in SCORE_ABS)
            penalty = (ratio - ratio.clamp(lo, hi)).abs() + (
                rms.clamp(abs_lo, abs_hi) / rms
            ).log().abs()
            (pen_grad,) = torch.autograd.grad(penalty, x)
        scale = pen_grad.pow(2).mean().sqrt().clamp(min=1e-20)
        g = grad.float()
        return (g + g.abs() * pen_grad * (BALANCER_SCALE / scale)).to(grad.dtype), None


def _normal_quantile(p: float) -> float:
    return math.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()


@dataclass
class Selection:
    index: torch.Tensor  # [b, k] kept positions, ascending (padding repeats the last position)
    weight: torch.Tensor  # [b, k] w of each kept token (0 for padding)
    valid: torch.Tensor  # [b, k] bool: a real kept token, not padding
    padded: bool = True  # False: every entry is valid (training's top-k)


class Downsample(nn.Module):
    """A linear scorer over the hidden state; selects the kept tokens and their weights."""

    def __init__(self, hidden: int, keep: float, causal: bool):
        super().__init__()
        self.score = nn.Linear(hidden, 1, bias=False)
        self.keep, self.causal = keep, causal

    def forward(self, x) -> Selection:
        scores = self.score(x).squeeze(-1).float()  # [b, s]
        if self.training and torch.is_grad_enabled():
            scores = _Balance.apply(scores, self.keep)
        if self.causal or not self.training:
            return _threshold(scores)
        return _top_k(scores, max(1, math.ceil(self.keep * scores.shape[1])))


def _top_k(scores, k: int) -> Selection:
    ranked, order = scores.sort(dim=-1, descending=True)
    w = ranked.clamp(0.0, 1.0)
    nxt = w[:, k : 2 * k]
    # the next k, zero-padded
    nxt = torch.cat([nxt, nxt.new_zeros(nxt.shape[0], k - nxt.shape[1])], dim=1)
    w, index = w[:, :k] - nxt, order[:, :k]
    index, back = index.sort(dim=-1)  # original order
    return Selection(
        index, torch.gather(w, 1, back), torch.ones_like(index, dtype=torch.bool), padded=False
    )


def _threshold(scores) -> Selection:
    """Keep positive scores (each token decides from its own score: causal). Rows keep different
    counts; shorter rows are padded at the end, after every real token, so causal attention never
    lets a real token see padding."""
    keep = scores > 0
    count = keep.sum(dim=1)
    k = max(1, int(count.max()))
    s = scores.shape[1]
    pos = torch.arange(s, device=scores.device).expand_as(scores)
    key = torch.where(keep, pos, pos + s)  # kept first, in order
    index = key.sort(dim=1).values[:, :k]
    valid = index < s
    index = torch.where(valid, index, torch.full_like(index, s - 1))
    w = torch.gather(scores.clamp(0.0, 1.0), 1, index) * valid
    return Selection(index, w, valid)


def pad_selection(sel: Selection, multiple: int, s: int) -> Selection:
    """Pad the kept tokens to a multiple of `multiple` (sequence-parallel shards) with invalid entries at
    the end, after every real token (causal attention never lets a real token see them)."""
    extra = -sel.index.shape[1] % multiple
    if not extra:
        return sel
    b = sel.index.shape[0]
    return Selection(
        torch.cat([sel.index, sel.index.new_full((b, extra), s - 1)], 1),
        torch.cat([sel.weight, sel.weight.new_zeros(b, extra)], 1),
        torch.cat([sel.valid, sel.valid.new_zeros(b, extra)], 1),
        padded=True,
    )


def gather_seq(x, index):
    """x [b, s, ...] -> [b, k, ...] at index [b, k]."""
    shape = index.shape + x.shape[2:]
    return torch.gather(x, 1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


def upsample(x, y, sel: Selection):
    """u = w * y + (1 - w) * x at kept positions, x elsewhere (padding writes nothing)."""
    w = sel.weight.unsqueeze(-1).to(y.dtype)
    kept = gather_seq(x, sel.index)
    mixed = w * y + (1 - w) * kept
    b, s, h = x.shape
    if not sel.padded:  # no padding: scatter straight into a copy of x
        return x.scatter(1, sel.index.unsqueeze(-1).expand(-1, -1, h), mixed)
    # padding goes to a spare row
    dump = torch.where(sel.valid, sel.index, torch.full_like(sel.index, s))
    out = torch.cat([x, x.new_zeros(b, 1, h)], dim=1)
    out = out.scatter(1, dump.unsqueeze(-1).expand(-1, -1, h), mixed)
    return out[:, :s]


class Bypass(nn.Module):
    """out = x + (u - x) * b, b per channel; b is held at or above a minimum that the trainer lowers."""

    def __init__(self, hidden: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((hidden,), 0.5))
        self.minimum = 0.0  # set per step (bypass_minimum)

    def forward(self, x, u):
        b = self.scale
        if self.training and self.minimum > 0:
            b = b.clamp(min=self.minimum)
        return x + (u - x) * b.to(x.dtype)


def bypass_minimum(step: int, warmup_steps: int) -> float:
    """0.9 at step 0 falling linearly to 0.2 at warmup_steps (SUBLLM's schedule), then 0.2."""
    frac = min(1.0, step / max(1, warmup_steps))
    return 0.9 + (0.2 - 0.9) * frac
