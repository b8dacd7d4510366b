"""Joins, splits and index rearrangements: the same operation on the variances (exact).

Every output element is a copy of one input element (or of a fixed one), so the same operation
applied to the variances is exact; deterministic pieces of a join contribute zero variance.
"""

from __future__ import annotations

import torch

from .engine import VarianceTracker, aliases, arg, rule
from .linear import replaced


@rule(
    torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack,
    torch.dstack,
)
def _join(tr: VarianceTracker, func, args, kwargs):
    """Join the variances (zeros for deterministic tensors) exactly as the tensors are joined."""
    tensors = arg(args, kwargs, 0, "tensors")
    out = func(*args, **kwargs)
    variances = [tr.var(t) if tr.var(t) is not None else torch.zeros_like(t) for t in tensors]
    vargs, vkwargs = replaced(args, kwargs, {0: ("tensors", variances)})
    return out, func(*vargs, **vkwargs).to(out.dtype)


@rule(*aliases(
    "split", "tensor_split", "chunk", "unbind", "narrow", "select", "flip", "fliplr", "flipud",
    "roll", "repeat", "tile", "repeat_interleave", "index_select", "gather", "take_along_dim",
))
def _rearrange(tr: VarianceTracker, func, args, kwargs):
    """Apply the same copy pattern to the variance of the (only floating) input.

    Tuple outputs (split, chunk, unbind) get a tuple of variances.
    """
    var = tr.var(arg(args, kwargs, 0, "input"))
    if var is None:
        raise tr.unsupported(f"{func.__name__} with an uncertain argument other than its input")
    out = func(*args, **kwargs)
    vargs, vkwargs = replaced(args, kwargs, {0: ("input", var)})
    return out, func(*vargs, **vkwargs)
