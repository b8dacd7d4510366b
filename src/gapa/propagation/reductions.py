"""Sums and means (exact).

They are linear maps whose outputs sum distinct inputs, so the variance of a sum is the sum of
the variances and a mean over ``n`` entries divides it by ``n^2``.
"""

from __future__ import annotations

from .engine import VarianceTracker, aliases, rule


@rule(*aliases("sum"))
def _sum(tr: VarianceTracker, func, args, kwargs):
    """Apply the same sum (``dim``, ``keepdim``, ``dtype``) to the variance."""
    if "out" in kwargs:
        raise tr.unsupported("torch.sum with out=")
    return func(*args, **kwargs), func(tr.var(args[0]), *args[1:], **kwargs)


@rule(*aliases("mean"))
def _mean(tr: VarianceTracker, func, args, kwargs):
    """Apply the same mean to the variance and divide it by ``n``, the entries averaged."""
    if "out" in kwargs:
        raise tr.unsupported("torch.mean with out=")
    x = args[0]
    out = func(*args, **kwargs)
    n = x.numel() // max(out.numel(), 1)
    return out, func(tr.var(x), *args[1:], **kwargs) / max(n, 1)
