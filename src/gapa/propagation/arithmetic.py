"""Sums, differences, products and quotients.

Two uncertain operands are treated as independent (exact for independent terms, an
approximation when they share an upstream cause). One tensor on both sides (``h + h``,
``h * h``, ``h / h``) is one function of it, not two independent draws: its rule is the delta
method on that function (``2 h``, ``2 h``, ``0``), as ``h.square()`` is ``h * h``.
"""

from __future__ import annotations

from typing import Any

import torch

from .engine import Tensor, VarianceTracker, aliases, arg, rule


def _operands(args, kwargs) -> tuple[Any, Any]:
    return args[0], arg(args, kwargs, 1, "other")


def same_operand(a: Any, b: Any) -> bool:
    """Return whether ``a`` and ``b`` are the same tensor entries: one object or one view.

    The same storage, offset, shape, strides and dtype: every entry of ``a`` is the entry of
    ``b`` at its position, so the two are perfectly correlated, not independent.
    """
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return False
    if a is b:
        return True
    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            and a.stride() == b.stride() and a.numel() > 0
            and a.data_ptr() == b.data_ptr())


def square(x: Any) -> Any:
    """Return ``x`` squared, for a tensor or a number."""
    return x.square() if isinstance(x, Tensor) else x * x


@rule(*aliases("add"), Tensor.__add__, Tensor.__radd__, Tensor.__iadd__)
def _add(tr: VarianceTracker, func, args, kwargs):
    """Variances add: exact for independent terms, an approximation for correlated ones."""
    return _sum(tr, func, args, kwargs, 1)


@rule(*aliases("sub"), Tensor.__sub__, Tensor.__isub__)
def _sub(tr: VarianceTracker, func, args, kwargs):
    return _sum(tr, func, args, kwargs, -1)


def _sum(tr: VarianceTracker, func, args, kwargs, sign: int):
    """Return ``a + sign * alpha * b`` and its variance.

    One tensor on both sides has the slope ``1 + sign * alpha``.
    """
    a, b = _operands(args, kwargs)
    alpha = kwargs.get("alpha", 1)
    if same_operand(a, b):
        var = tr.var_or_zero(a) * float(1 + sign * alpha) ** 2
    else:
        var = tr.var_or_zero(a) + alpha**2 * tr.var_or_zero(b)
    return func(*args, **kwargs), var


@rule(Tensor.__rsub__)
def _rsub(tr: VarianceTracker, func, args, kwargs):
    return _neg(tr, func, args, kwargs)


@rule(*aliases("mul"), Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__)
def _mul(tr: VarianceTracker, func, args, kwargs):
    """Var(ab) = b^2 Va + a^2 Vb + Va Vb for independent a, b (a constant has V = 0).

    ``a * a`` is ``a.square()``: ``(2 a)^2 Va``, first order.
    """
    a, b = _operands(args, kwargs)
    va, vb = tr.var_or_zero(a), tr.var_or_zero(b)
    same = same_operand(a, b)
    var = square(2.0 * a) * va if same else square(b) * va + square(a) * vb + va * vb
    return func(*args, **kwargs), var


@rule(*aliases("div"), Tensor.__truediv__, Tensor.__itruediv__)
def _div(tr: VarianceTracker, func, args, kwargs):
    """First order in numerator and denominator: Va / b^2 + a^2 Vb / b^4."""
    a, b = _operands(args, kwargs)
    if kwargs.get("rounding_mode") is not None:
        raise tr.unsupported(f"division with rounding_mode={kwargs['rounding_mode']!r}")
    if same_operand(a, b):  # a / a is 1 wherever it is defined
        out = func(*args, **kwargs)
        return out, torch.zeros_like(out)
    va, vb = tr.var_or_zero(a), tr.var_or_zero(b)
    b2 = square(b)
    var = va / b2 + (square(a) * vb / b2.square() if tr.var(b) is not None else 0.0)
    return func(*args, **kwargs), var


@rule(*aliases("neg", "positive"), Tensor.__neg__, Tensor.__pos__)
def _neg(tr: VarianceTracker, func, args, kwargs):
    var = tr.var(args[0])  # before an in-place neg_ writes it
    return func(*args, **kwargs), var
