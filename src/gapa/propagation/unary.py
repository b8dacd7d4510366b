"""Elementwise maths by the delta method, casts, and selections.

The delta method gives ``var_out = f'(mu)^2 var_in`` (first order). Selections (``where``,
``masked_fill``, ``clamp``) pick one operand's variance per entry (exact, away from the
switching points).

The slope is taken from the input before ``func`` runs, so in-place variants (``x.pow_(2)``)
see their input, not their result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Number
from typing import Any

import torch

from .engine import Tensor, VarianceTracker, aliases, arg, rule


def _delta(derivative: Callable[[Tensor], Tensor]):
    def apply(tr: VarianceTracker, func, args, kwargs):
        x = args[0]
        var = derivative(x).square() * tr.var(x)
        return func(*args, **kwargs), var

    return apply


rule(*aliases("exp"))(_delta(torch.exp))
rule(*aliases("log"))(_delta(torch.reciprocal))
rule(*aliases("log1p"))(_delta(lambda x: torch.reciprocal(1.0 + x)))
rule(*aliases("expm1"))(_delta(torch.exp))
rule(*aliases("sqrt"))(_delta(lambda x: 0.5 * torch.rsqrt(x)))
rule(*aliases("rsqrt"))(_delta(lambda x: -0.5 * torch.rsqrt(x).pow(3)))
rule(*aliases("reciprocal"))(_delta(lambda x: -torch.reciprocal(x).square()))
rule(*aliases("square"))(_delta(lambda x: 2.0 * x))
# |x| has slope sign(x): 0 at x = 0, where it has no derivative (as autograd).
rule(*aliases("abs", "absolute"), Tensor.__abs__)(_delta(torch.sign))
rule(*aliases("sin"))(_delta(torch.cos))
rule(*aliases("cos"))(_delta(torch.sin))  # squared: sign is moot
rule(*aliases("erf"))(_delta(lambda x: (2.0 / math.sqrt(math.pi)) * torch.exp(-x.square())))


def _pow_var(tr: VarianceTracker, base: Any, exponent: Any) -> Tensor:
    """Return the variance of ``base ** exponent``, first order in both.

    That is ``(e b^(e-1))^2 Vb + (b^e ln b)^2 Ve``, the two independent when both are uncertain.
    """
    vb, ve = tr.var(base), tr.var(exponent)
    var: Tensor | float = 0.0
    if vb is not None:
        if isinstance(exponent, Number):
            slope = 0.0 if exponent == 0 else exponent * torch.pow(base, exponent - 1)
        else:
            slope = torch.where(exponent == 0, 0.0, exponent * torch.pow(base, exponent - 1))
        var = var + (slope * slope) * vb
    if ve is not None:
        b = torch.as_tensor(base, dtype=exponent.dtype, device=exponent.device)
        var = var + (torch.pow(b, exponent) * torch.log(b)).square() * ve
    return var


@rule(*aliases("pow"), Tensor.__pow__, Tensor.__ipow__)
def _pow(tr: VarianceTracker, func, args, kwargs):
    base = arg(args, kwargs, 0, "input", kwargs.get("self"))
    exponent = arg(args, kwargs, 1, "exponent")
    var = _pow_var(tr, base, exponent)
    return func(*args, **kwargs), var


@rule(Tensor.__rpow__)
def _rpow(tr: VarianceTracker, func, args, kwargs):
    """``other ** self``: the exponent is the tensor."""
    var = _pow_var(tr, args[1], args[0])
    return func(*args, **kwargs), var


# --- selections ----------------------------------------------------------------------------------


def _select(cond: Tensor, va: Tensor | float, vb: Tensor | float, shape) -> Tensor:
    var = torch.where(cond, va, vb)
    return var if var.shape == shape else var.expand(shape).clone()


@rule(*aliases("clamp", "clip"))
def _clamp(tr: VarianceTracker, func, args, kwargs):
    """Give each entry of ``min(max(x, lo), hi)`` the variance of the operand it came from.

    For ``x`` that is slope 1 inside ``[lo, hi]`` and 0 outside.
    """
    lo, hi = arg(args, kwargs, 1, "min"), arg(args, kwargs, 2, "max")
    return _clamp_var(tr, func, args, kwargs, lo, hi)


@rule(*aliases("clamp_min"))
def _clamp_min(tr: VarianceTracker, func, args, kwargs):
    return _clamp_var(tr, func, args, kwargs, arg(args, kwargs, 1, "min"), None)


@rule(*aliases("clamp_max"))
def _clamp_max(tr: VarianceTracker, func, args, kwargs):
    return _clamp_var(tr, func, args, kwargs, None, arg(args, kwargs, 1, "max"))


def _clamp_var(tr: VarianceTracker, func, args, kwargs, lo, hi):
    x = args[0]
    a, var = x, tr.var_or_zero(x)
    if lo is not None:
        keep = a >= lo
        var = torch.where(keep, var, tr.var_or_zero(lo))
        a = torch.where(keep, a, lo)
    if hi is not None:
        keep = a <= hi
        var = torch.where(keep, var, tr.var_or_zero(hi))
    out = func(*args, **kwargs)
    if not isinstance(var, Tensor):  # neither bound given: torch has raised already
        var = torch.zeros_like(out)
    return out, var if var.shape == out.shape else var.expand(out.shape).clone()


@rule(*aliases("where"))
def _where(tr: VarianceTracker, func, args, kwargs):
    """Give each entry the variance of the branch it selects (exact)."""
    if func is Tensor.where:  # x.where(condition, y) is torch.where(condition, x, y)
        cond, a, b = arg(args, kwargs, 1, "condition"), args[0], arg(args, kwargs, 2, "other")
    else:
        cond = arg(args, kwargs, 0, "condition")
        a, b = arg(args, kwargs, 1, "input"), arg(args, kwargs, 2, "other")
    out = func(*args, **kwargs)
    return out, _select(cond, tr.var_or_zero(a), tr.var_or_zero(b), out.shape)


@rule(*aliases("masked_fill"))
def _masked_fill(tr: VarianceTracker, func, args, kwargs):
    """Give filled entries the fill value's variance (0 for a number)."""
    x, mask = args[0], arg(args, kwargs, 1, "mask")
    value = arg(args, kwargs, 2, "value")
    var = _select(mask, tr.var_or_zero(value), tr.var_or_zero(x), x.shape)
    return func(*args, **kwargs), var


# --- casts ---------------------------------------------------------------------------------------


@rule(Tensor.type_as, Tensor.type, Tensor.half, Tensor.bfloat16)
def _cast(tr: VarianceTracker, func, args, kwargs):
    """Apply the same cast to the variance; ``x.type()`` with no dtype returns a string."""
    out = func(*args, **kwargs)
    if not isinstance(out, Tensor):
        return out, None
    return out, func(tr.var(args[0]), *args[1:], **kwargs)


@rule(torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, Tensor.new_zeros,
      Tensor.new_ones, Tensor.new_full, Tensor.new_empty, Tensor.new_tensor)
def _constant_like(tr: VarianceTracker, func, args, kwargs):
    """Return the constant shaped like an uncertain tensor, with no variance."""
    return func(*args, **kwargs), None
