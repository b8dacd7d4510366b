"""Pooling: average pools exactly, max pools to first order.

Average pools are linear, ``out_i = sum_k x_k / D_i``: the variance is ``sum_k v_k / D_i^2``
(exact), ``D_i`` the window's divisor. Max pools pass the arg-max element through (the Jacobian
at the mean is one-hot): the output variance is that element's variance, first order (it
ignores the chance that noise changes which element is the largest).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .engine import Tensor, VarianceTracker, arg, rule
from .linear import replaced

_AVG_SPATIAL = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}


@rule(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def _avg_pool(tr: VarianceTracker, func, args, kwargs):
    """Pool the variance and divide it by ``D = n / pool(1)``.

    ``n`` counts the real (not padded) inputs of each window: this covers padding,
    ``count_include_pad``, ``ceil_mode`` windows that run over the edge, and
    ``divisor_override``.
    """
    x = arg(args, kwargs, 0, "input")
    out = func(*args, **kwargs)
    vargs, vkwargs = replaced(args, kwargs, {0: ("input", tr.var(x))})
    pooled = func(*vargs, **vkwargs)
    spatial = _AVG_SPATIAL[func]
    ones = torch.ones((1,) * (x.dim() - spatial) + tuple(x.shape[-spatial:]), dtype=x.dtype,
                      device=x.device)
    oargs, okwargs = replaced(args, kwargs, {0: ("input", ones)})
    mean_of_ones = func(*oargs, **okwargs)
    count = _real_inputs_per_window(func, ones, args, kwargs).clamp_min(1)
    return out, pooled * (mean_of_ones / count)


def _real_inputs_per_window(func, ones: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """Count the real inputs each window of the pool covers: the pool of ones as a sum.

    That is ``divisor_override=1``; ``avg_pool1d`` has none, so it runs as a 2-D pool of
    height 1.
    """
    if func is not F.avg_pool1d:
        sargs, skwargs = replaced(args, kwargs, {0: ("input", ones), 6: ("divisor_override", 1)})
        return func(*sargs, **skwargs)
    kernel = _single(arg(args, kwargs, 1, "kernel_size"))
    stride = _single(arg(args, kwargs, 2, "stride")) or kernel
    padding = _single(arg(args, kwargs, 3, "padding", 0))
    ceil_mode = arg(args, kwargs, 4, "ceil_mode", False)
    include_pad = arg(args, kwargs, 5, "count_include_pad", True)
    return F.avg_pool2d(
        ones.unsqueeze(-2), (1, kernel), (1, stride), (0, padding), ceil_mode, include_pad, 1
    ).squeeze(-2)


def _single(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return int(value)


_ADAPTIVE_AVG_SPATIAL = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
                         F.adaptive_avg_pool3d: 3}


@rule(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
def _adaptive_avg_pool(tr: VarianceTracker, func, args, kwargs):
    """Pool the variance and divide it by ``D``, the product of the bin lengths.

    Output ``i`` of each dim averages the bin ``[floor(i n / m), ceil((i + 1) n / m))``
    (PyTorch's bins).
    """
    x = arg(args, kwargs, 0, "input")
    out = func(*args, **kwargs)
    vargs, vkwargs = replaced(args, kwargs, {0: ("input", tr.var(x))})
    var = func(*vargs, **vkwargs)
    spatial = _ADAPTIVE_AVG_SPATIAL[func]
    for d in range(spatial):
        n, m = x.shape[x.dim() - spatial + d], out.shape[out.dim() - spatial + d]
        i = torch.arange(m, device=x.device)
        length = ((i + 1) * n + m - 1) // m - (i * n) // m
        shape = [m] + [1] * (spatial - 1 - d)
        var = var / length.to(var.dtype).reshape(shape)
    return out, var


#: Each max pool and the variant of it that also returns the arg-max indices.
_WITH_INDICES = {
    F.max_pool1d: F.max_pool1d_with_indices, F.max_pool2d: F.max_pool2d_with_indices,
    F.max_pool3d: F.max_pool3d_with_indices,
    F.adaptive_max_pool1d: F.adaptive_max_pool1d_with_indices,
    F.adaptive_max_pool2d: F.adaptive_max_pool2d_with_indices,
    F.adaptive_max_pool3d: F.adaptive_max_pool3d_with_indices,
}
_MAX_SPATIAL = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
}
_MAX_SPATIAL.update({_WITH_INDICES[f]: s for f, s in list(_MAX_SPATIAL.items())})


@rule(*_MAX_SPATIAL)
def _max_pool(tr: VarianceTracker, func, args, kwargs):
    """Gather the variance of each window's arg-max element through the pool's indices.

    First order; ``return_indices=True`` calls get ``(variance, None)``.
    """
    x = arg(args, kwargs, 0, "input")
    out = func(*args, **kwargs)
    if isinstance(out, tuple):
        values, indices = out
    else:
        values = out
        _, indices = _WITH_INDICES[func](*args, **kwargs)
    spatial = _MAX_SPATIAL[func]
    flat = tr.var(x).flatten(-spatial)
    var = flat.gather(-1, indices.flatten(-spatial)).reshape(values.shape)
    return out, (var, None) if isinstance(out, tuple) else var
