"""Sums, differences, products and quotients; two uncertain operands are treated as independent
(exact for independent terms, an approximation when they share an upstream cause)."""

from __future__ import annotations

from typing import Any

import torch

from .engine import Tensor, VarianceTracker, rule


def _operands(args, kwargs) -> tuple[Any, Any]:
    return args[0], args[1] if len(args) > 1 else kwargs.get("other")


def square(x: Any) -> Any:
    return x.square() if isinstance(x, Tensor) else x * x


@rule(torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.add_, Tensor.__iadd__)
def _add(tr: VarianceTracker, func, args, kwargs):
    """Variances add: exact for independent terms, an approximation for correlated ones."""
    a, b = _operands(args, kwargs)
    alpha = kwargs.get("alpha", 1)
    var = tr.var_or_zero(a) + alpha**2 * tr.var_or_zero(b)
    return func(*args, **kwargs), var


@rule(torch.sub, Tensor.sub, Tensor.__sub__, Tensor.sub_, Tensor.__isub__)
def _sub(tr: VarianceTracker, func, args, kwargs):
    return _add(tr, func, args, kwargs)


@rule(Tensor.__rsub__)
def _rsub(tr: VarianceTracker, func, args, kwargs):
    return func(*args, **kwargs), tr.var(args[0])


@rule(torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.mul_, Tensor.__imul__)
def _mul(tr: VarianceTracker, func, args, kwargs):
    """Var(ab) = b^2 Va + a^2 Vb + Va Vb for independent a, b (a constant has V = 0)."""
    a, b = _operands(args, kwargs)
    va, vb = tr.var_or_zero(a), tr.var_or_zero(b)
    var = square(b) * va + square(a) * vb + va * vb
    return func(*args, **kwargs), var


@rule(torch.div, Tensor.div, Tensor.__truediv__, Tensor.div_, Tensor.__itruediv__)
def _div(tr: VarianceTracker, func, args, kwargs):
    """First order in numerator and denominator: Va / b^2 + a^2 Vb / b^4."""
    a, b = _operands(args, kwargs)
    if kwargs.get("rounding_mode") is not None:
        raise tr.unsupported(f"division with rounding_mode={kwargs['rounding_mode']!r}")
    va, vb = tr.var_or_zero(a), tr.var_or_zero(b)
    b2 = square(b)
    var = va / b2 + (square(a) * vb / b2.square() if tr.var(b) is not None else 0.0)
    return func(*args, **kwargs), var


@rule(torch.neg, Tensor.neg, Tensor.__neg__, Tensor.__pos__, torch.positive)
def _neg(tr: VarianceTracker, func, args, kwargs):
    return func(*args, **kwargs), tr.var(args[0])
