"""Linear maps: the output variance is the map applied to the variance with squared weights.

This is exact: a linear map of independent units has ``diag(W diag(v) W^T) = (W * W) v``.

Covered: ``F.linear``, the convolutions and transposed convolutions (1-, 2- and 3-D), batch norm
with running statistics, ``F.pad`` (every mode) and ``F.interpolate`` (every mode). A bias that
carries a variance adds it; an uncertain weight (a product of two uncertain factors) is refused.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from .engine import Tensor, VarianceTracker, arg, rule


def replaced(args: tuple, kwargs: dict, changes: dict[int, tuple[str, Any]]) -> tuple[tuple, dict]:
    """Return ``args, kwargs`` with the arguments ``{index: (name, value)}`` replaced.

    An argument given positionally is replaced in place, else by keyword; ``out=`` is dropped
    so the variance has its own tensor.
    """
    args, kwargs = list(args), {k: v for k, v in kwargs.items() if k != "out"}
    for index, (name, value) in changes.items():
        if len(args) > index:
            args[index] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _bias_variance(tr: VarianceTracker, bias: Any, out: Tensor, spatial: int) -> Tensor | float:
    """Return the variance of an uncertain bias broadcast over the output (0 for a fixed one)."""
    vb = tr.var(bias)
    return 0.0 if vb is None else vb.reshape(-1, *([1] * spatial)).expand_as(out)


@rule(F.linear)
def _linear(tr: VarianceTracker, func, args, kwargs):
    x, weight = args[0], arg(args, kwargs, 1, "weight")
    if tr.var(weight) is not None:
        raise tr.unsupported("F.linear with an uncertain weight")
    out = func(*args, **kwargs)
    vx = tr.var(x)
    var = torch.zeros_like(out) if vx is None else F.linear(vx, weight.square())
    vb = tr.var(arg(args, kwargs, 2, "bias"))
    return out, var if vb is None else var + vb


@rule(F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def _conv(tr: VarianceTracker, func, args, kwargs):
    """Apply the same convolution to the variance, with the squared kernel and no bias.

    Stride, padding, dilation, groups and output padding are kept; an uncertain bias adds its
    variance.
    """
    x, weight = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
    bias = arg(args, kwargs, 2, "bias")
    if tr.var(weight) is not None:
        raise tr.unsupported(f"{func.__name__} with an uncertain weight")
    out = func(*args, **kwargs)
    vx = tr.var(x)
    if vx is None:
        var = torch.zeros_like(out)
    else:
        vargs, vkwargs = replaced(
            args, kwargs, {0: ("input", vx), 1: ("weight", weight.square()), 2: ("bias", None)}
        )
        var = func(*vargs, **vkwargs)
    return out, var + _bias_variance(tr, bias, out, weight.dim() - 2)


_BATCH_NORM = inspect.signature(F.batch_norm)


@rule(F.batch_norm)
def _batch_norm(tr: VarianceTracker, func, args, kwargs):
    """Scale the variance by ``w^2 / (v + eps)`` per channel (eval-mode batch norm; exact).

    Eval-mode batch norm is the per-channel affine map ``w (x - m) / sqrt(v + eps) + b``. With
    batch statistics (training mode, or no running statistics) every output depends on the
    whole batch: refused.
    """
    p = _BATCH_NORM.bind(*args, **kwargs)
    p.apply_defaults()
    a = p.arguments
    x, mean, rvar, weight = a["input"], a["running_mean"], a["running_var"], a["weight"]
    if a["training"] or mean is None or rvar is None:
        raise tr.unsupported(
            "F.batch_norm with batch statistics (training mode or track_running_stats=False; "
            "call model.eval() on a network with running statistics)"
        )
    if any(tr.var(t) is not None for t in (mean, rvar, weight)):
        raise tr.unsupported("F.batch_norm with uncertain running statistics or weight")
    out = func(*args, **kwargs)
    shape = (-1, *([1] * (x.dim() - 2)))
    vx = tr.var(x)
    if vx is None:
        var = torch.zeros_like(out)
    else:
        scale = 1.0 / (rvar + a["eps"])
        if weight is not None:
            scale = weight.square() * scale
        var = vx * scale.reshape(shape)
    vb = tr.var(a["bias"])
    return out, var if vb is None else var + vb.reshape(shape)


@rule(F.pad)
def _pad(tr: VarianceTracker, func, args, kwargs):
    """Pad the variance the same way; constant padding adds fixed values (zero variance).

    Reflect, replicate and circular padding copy input elements, so the same padding of the
    variance is exact.
    """
    out = func(*args, **kwargs)
    vargs, vkwargs = replaced(args, kwargs, {0: ("input", tr.var(args[0]))})
    if arg(args, kwargs, 2, "mode", "constant") == "constant":
        vargs, vkwargs = replaced(vargs, vkwargs, {3: ("value", 0.0)})
    return out, func(*vargs, **vkwargs)


_INTERPOLATE = inspect.signature(F.interpolate)


@rule(F.interpolate)
def _interpolate(tr: VarianceTracker, func, args, kwargs):
    """Interpolate the variance exactly: nearest modes copy, the others are linear maps.

    Nearest modes copy input elements: the same op on the variance. The other modes (linear,
    bilinear, bicubic, trilinear, area, with or without antialias) are separable linear maps
    ``x -> W_1 x W_2 ...`` along the spatial dims, so the variance goes through the squared
    per-dim matrices ``W_d * W_d`` (exact). ``W_d`` is read off by interpolating an identity
    along dim ``d`` (see :func:`_interpolation_matrix`).
    """
    out = func(*args, **kwargs)
    p = _INTERPOLATE.bind(*args, **kwargs)
    p.apply_defaults()
    a = dict(p.arguments)
    var = tr.var(a["input"])
    if a["mode"] in ("nearest", "nearest-exact"):
        return out, func(var, **{k: v for k, v in a.items() if k != "input"})
    spatial = var.dim() - 2
    for d in range(spatial):
        wt = _interpolation_matrix(func, a, var, d, spatial)  # (in_d, out_d)
        var = (var.movedim(2 + d, -1) @ wt.square()).movedim(-1, 2 + d)
    return out, var


def _per_dim(value: Any, spatial: int) -> list | None:
    if value is None:
        return None
    return list(value) if isinstance(value, list | tuple | torch.Size) else [value] * spatial


def _interpolation_matrix(func, a: dict, var: Tensor, d: int, spatial: int) -> Tensor:
    """Return the transposed 1-D interpolation matrix of spatial dim ``d``.

    Rows are input indices, columns output indices. Each spatial dim's weights depend only on
    its own sizes, scale and alignment; the probe's other spatial dims have size 2 kept at 2
    (where every mode is the identity; size 1 is avoided because antialiased modes mishandle
    it).
    """
    n = var.shape[2 + d]
    line = [n, 1] + [1] * spatial
    line[2 + d] = n
    shape = [n, 1] + [2] * spatial
    shape[2 + d] = n
    probe = torch.eye(n, dtype=var.dtype, device=var.device).reshape(line).expand(shape)
    size, scale = _per_dim(a["size"], spatial), _per_dim(a["scale_factor"], spatial)
    if size is not None:
        size = [s if i == d else 2 for i, s in enumerate(size)]
    if scale is not None:
        scale = [s if i == d else 1.0 for i, s in enumerate(scale)]
    w = func(probe.contiguous(), size=size, scale_factor=scale, mode=a["mode"],
             align_corners=a["align_corners"],
             recompute_scale_factor=a["recompute_scale_factor"], antialias=a["antialias"])
    w = w[(slice(None), 0, *(slice(None) if i == d else 0 for i in range(spatial)))]
    return w.reshape(n, -1)
