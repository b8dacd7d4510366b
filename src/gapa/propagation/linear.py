"""Linear maps: the output variance is the map applied to the variance with squared weights
(exact: a linear map of independent units has ``diag(W diag(v) W^T) = (W * W) v``)."""

from __future__ import annotations

import torch.nn.functional as F

from .engine import VarianceTracker, rule


@rule(F.linear)
def _linear(tr: VarianceTracker, func, args, kwargs):
    x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    if tr.var(weight) is not None:
        raise tr.unsupported("F.linear with an uncertain weight")
    out = func(*args, **kwargs)
    return out, F.linear(tr.var(x), weight.square())
