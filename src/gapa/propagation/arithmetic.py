"""Sums, differences, products and quotients.

Two uncertain operands are treated as independent (exact for independent terms, an
approximation when they share an upstream cause).
"""

from __future__ import annotations

from typing import Any

from .engine import Tensor, VarianceTracker, aliases, arg, rule


def _operands(args, kwargs) -> tuple[Any, Any]:
    return args[0], arg(args, kwargs, 1, "other")


def square(x: Any) -> Any:
    """Return ``x`` squared, for a tensor or a number."""
    return x.square() if isinstance(x, Tensor) else x * x


@rule(*aliases("add"), Tensor.__add__, Tensor.__radd__, Tensor.__iadd__)
def _add(tr: VarianceTracker, func, args, kwargs):
    """Variances add: exact for independent terms, an approximation for correlated ones."""
    a, b = _operands(args, kwargs)
    alpha = kwargs.get("alpha", 1)
    var = tr.var_or_zero(a) + alpha**2 * tr.var_or_zero(b)
    return func(*args, **kwargs), var


@rule(*aliases("sub"), Tensor.__sub__, Tensor.__isub__)
def _sub(tr: VarianceTracker, func, args, kwargs):
    return _add(tr, func, args, kwargs)


@rule(Tensor.__rsub__)
def _rsub(tr: VarianceTracker, func, args, kwargs):
    return _neg(tr, func, args, kwargs)


@rule(*aliases("mul"), Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__)
def _mul(tr: VarianceTracker, func, args, kwargs):
    """Var(ab) = b^2 Va + a^2 Vb + Va Vb for independent a, b (a constant has V = 0)."""
    a, b = _operands(args, kwargs)
    va, vb = tr.var_or_zero(a), tr.var_or_zero(b)
    var = square(b) * va + square(a) * vb + va * vb
    return func(*args, **kwargs), var


@rule(*aliases("div"), Tensor.__truediv__, Tensor.__itruediv__)
def _div(tr: VarianceTracker, func, args, kwargs):
    """First order in numerator and denominator: Va / b^2 + a^2 Vb / b^4."""
    a, b = _operands(args, kwargs)
    if kwargs.get("rounding_mode") is not None:
        raise tr.unsupported(f"division with rounding_mode={kwargs['rounding_mode']!r}")
    va, vb = tr.var_or_zero(a), tr.var_or_zero(b)
    b2 = square(b)
    var = va / b2 + (square(a) * vb / b2.square() if tr.var(b) is not None else 0.0)
    return func(*args, **kwargs), var


@rule(*aliases("neg", "positive"), Tensor.__neg__, Tensor.__pos__)
def _neg(tr: VarianceTracker, func, args, kwargs):
    var = tr.var(args[0])  # before an in-place neg_ writes it
    return func(*args, **kwargs), var
