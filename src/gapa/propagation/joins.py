"""Joins, splits and index rearrangements: every output element is a copy of one input element
(or of a fixed one), so the same operation applied to the variances is exact; deterministic
pieces of a join contribute zero variance.
"""

from __future__ import annotations

import torch

from .engine import Tensor, VarianceTracker, rule
from .linear import argument, replaced


@rule(
    torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack,
    torch.dstack,
)
def _join(tr: VarianceTracker, func, args, kwargs):
    """Join the variances (zeros for deterministic tensors) exactly as the tensors are joined."""
    tensors = argument(args, kwargs, 0, "tensors")
    out = func(*args, **kwargs)
    variances = [tr.var(t) if tr.var(t) is not None else torch.zeros_like(t) for t in tensors]
    vargs, vkwargs = replaced(args, kwargs, {0: ("tensors", variances)})
    return out, func(*vargs, **vkwargs).to(out.dtype)


@rule(
    torch.split, Tensor.split, torch.tensor_split, Tensor.tensor_split, torch.chunk,
    Tensor.chunk, torch.unbind, Tensor.unbind, torch.narrow, Tensor.narrow, torch.select,
    Tensor.select, torch.flip, Tensor.flip, torch.fliplr, torch.flipud, torch.roll, Tensor.roll,
    Tensor.repeat, torch.tile, Tensor.tile, torch.repeat_interleave, Tensor.repeat_interleave,
    torch.index_select, Tensor.index_select, torch.gather, Tensor.gather,
    torch.take_along_dim, Tensor.take_along_dim,
)
def _rearrange(tr: VarianceTracker, func, args, kwargs):
    """The same copy pattern applied to the variance of the (only floating) input; tuple
    outputs (split, chunk, unbind) get a tuple of variances."""
    var = tr.var(argument(args, kwargs, 0, "input"))
    if var is None:
        raise tr.unsupported(f"{func.__name__} with an uncertain argument other than its input")
    out = func(*args, **kwargs)
    vargs, vkwargs = replaced(args, kwargs, {0: ("input", var)})
    return out, func(*vargs, **vkwargs)
