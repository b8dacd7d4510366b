"""Writes into tensors: written entries take the written values' variance, the others keep theirs.

Constants written have variance 0. The engine passes the result on to the written tensor's
base, so every view of the same storage sees the write.

Each rule reads the variances before the operation runs (an in-place write changes its
target), the written values' before the target's, and updates the target's variance in place
where the tracker says nothing else holds it, so a buffer filled in a loop costs linear time.
"""

from __future__ import annotations

from typing import Any

import torch

from .engine import Tensor, VarianceTracker, aliases, arg, rule


def _target(tr: VarianceTracker, func, t: Tensor) -> Tensor:
    """Return the variance of ``t`` to write into.

    For an in-place ``func`` it is the tracker's (updated in place where it may be), for an
    out-of-place one a copy (``t`` keeps its own).
    """
    if func is Tensor.__setitem__ or func.__name__.endswith("_"):
        return tr.writable(t)
    v = tr.var(t)
    return torch.zeros_like(t) if v is None else v.clone()


def _source_var(tr: VarianceTracker, value: Any, like: Tensor) -> Tensor | float:
    """Return the variance of written values, in ``like``'s dtype.

    That is a tensor's own (zeros when deterministic), or 0 for a number.
    """
    if not isinstance(value, Tensor):
        return 0.0
    v = tr.var(value)
    return torch.zeros_like(value, dtype=like.dtype) if v is None else v.to(like.dtype)


@rule(Tensor.__setitem__)
def _setitem(tr: VarianceTracker, func, args, kwargs):
    """``t[index] = value``."""
    t, index, value = args
    src = _source_var(tr, value, t)
    var = _target(tr, func, t)
    var[index] = src
    return func(*args, **kwargs), var


@rule(Tensor.copy_)
def _copy(tr: VarianceTracker, func, args, kwargs):
    """``t.copy_(src)``: ``src`` broadcast to ``t``."""
    t, src = args[0], arg(args, kwargs, 1, "src")
    var = torch.zeros_like(t)
    var.copy_(_source_var(tr, src, t))
    return func(*args, **kwargs), var


@rule(Tensor.fill_, Tensor.zero_, torch.fill_, torch.zero_)
def _fill(tr: VarianceTracker, func, args, kwargs):
    """Give every entry the fill value's variance (0 for a number)."""
    t, value = args[0], arg(args, kwargs, 1, "value")
    var = torch.zeros_like(t)
    if isinstance(value, Tensor) and tr.var(value) is not None:
        var.copy_(tr.var(value).expand(t.shape))
    return func(*args, **kwargs), var


@rule(*aliases("index_put"))
def _index_put(tr: VarianceTracker, func, args, kwargs):
    """Give put entries the values' variances; with ``accumulate`` the variances add.

    The accumulated values are treated as independent.
    """
    t, indices = args[0], arg(args, kwargs, 1, "indices")
    values = arg(args, kwargs, 2, "values")
    accumulate = bool(arg(args, kwargs, 3, "accumulate", False))
    src = _source_var(tr, values, t)
    src = src if isinstance(src, Tensor) else torch.zeros_like(values, dtype=t.dtype)
    var = _target(tr, func, t).index_put_(indices, src, accumulate=accumulate)
    return func(*args, **kwargs), var


def _scatter_like(tr: VarianceTracker, func, args, kwargs, *, adds: bool):
    t, dim, index = args[0], arg(args, kwargs, 1, "dim"), arg(args, kwargs, 2, "index")
    src = arg(args, kwargs, 3, "src", kwargs.get("value"))
    reduce = kwargs.get("reduce")
    if reduce is not None and reduce != "add":
        raise tr.unsupported(f"{func.__name__} with reduce={reduce!r}")
    adds = adds or reduce == "add"
    if not isinstance(src, Tensor):  # a number: adding it keeps the variance, writing zeroes it
        var = _target(tr, func, t)
        return func(*args, **kwargs), var if adds else var.scatter_(dim, index, 0.0)
    src_var = _source_var(tr, src, t)
    var = _target(tr, func, t)
    var = var.scatter_add_(dim, index, src_var) if adds else var.scatter_(dim, index, src_var)
    return func(*args, **kwargs), var


@rule(*aliases("scatter"))
def _scatter(tr: VarianceTracker, func, args, kwargs):
    """Give scattered entries the source's variance (``reduce="add"``: add it to theirs)."""
    return _scatter_like(tr, func, args, kwargs, adds=False)


@rule(*aliases("scatter_add"))
def _scatter_add(tr: VarianceTracker, func, args, kwargs):
    """Add the source's variances to the entries the source is added to."""
    return _scatter_like(tr, func, args, kwargs, adds=True)


@rule(*aliases("index_copy"))
def _index_copy(tr: VarianceTracker, func, args, kwargs):
    t, dim, index = args[0], arg(args, kwargs, 1, "dim"), arg(args, kwargs, 2, "index")
    src = _source_var(tr, arg(args, kwargs, 3, "source"), t)
    var = _target(tr, func, t).index_copy_(dim, index, src)
    return func(*args, **kwargs), var


@rule(*aliases("index_add"))
def _index_add(tr: VarianceTracker, func, args, kwargs):
    """``t.index_add_(dim, index, source, alpha=a)``: ``a^2`` times the source's variance adds."""
    t, dim, index = args[0], arg(args, kwargs, 1, "dim"), arg(args, kwargs, 2, "index")
    src = _source_var(tr, arg(args, kwargs, 3, "source"), t)
    alpha = kwargs.get("alpha", 1)
    var = _target(tr, func, t).index_add_(dim, index, src, alpha=alpha**2)
    return func(*args, **kwargs), var


@rule(*aliases("index_fill"))
def _index_fill(tr: VarianceTracker, func, args, kwargs):
    t, dim, index = args[0], arg(args, kwargs, 1, "dim"), arg(args, kwargs, 2, "index")
    value = arg(args, kwargs, 3, "value")
    if isinstance(value, Tensor) and tr.var(value) is not None:
        raise tr.unsupported(f"{func.__name__} with an uncertain fill value")
    var = _target(tr, func, t).index_fill_(dim, index, 0.0)
    return func(*args, **kwargs), var
