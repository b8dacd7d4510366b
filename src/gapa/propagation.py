"""Diagonal moment propagation through an unmodified PyTorch forward pass.

A :class:`VarianceTracker` is a ``TorchFunctionMode``: every torch function the network calls
runs exactly as it would without it (so the mean is the frozen network's output, bit for bit),
and when an input of that call carries a variance, the operation's rule computes the variance
of its output: ``diag(J diag(var_in) J^T)`` with ``J`` the Jacobian at the mean, units treated as
independent. An operation with an uncertain input and no rule raises
:class:`~gapa.errors.UnsupportedOperationError`: variance is never dropped silently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .errors import UnsupportedOperationError

Tensor = torch.Tensor
Rule = Callable[["VarianceTracker", Callable, tuple, dict], tuple[Any, Tensor | None]]
RULES: dict[Callable, Rule] = {}


def rule(*funcs: Callable) -> Callable[[Rule], Rule]:
    """Register a variance rule for one or several torch functions (aliases, methods)."""

    def register(fn: Rule) -> Rule:
        for f in funcs:
            RULES[f] = fn
        return fn

    return register


class VarianceTracker(TorchFunctionMode):
    """Carries a variance beside every uncertain tensor of one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self._var: dict[int, tuple[Tensor, Tensor]] = {}
        self.suspended = False
        self.module_path: list[str] = []

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run torch code (e.g. GP variances inside hooks) without applying variance rules."""
        self.suspended = True
        try:
            yield
        finally:
            self.suspended = False

    def var(self, t: Any) -> Tensor | None:
        """The variance carried by ``t``, or None when ``t`` is deterministic."""
        entry = self._var.get(id(t)) if isinstance(t, Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def set_var(self, t: Tensor, var: Tensor) -> None:
        # The tensor is kept alive with its variance so its id cannot be reused in this pass.
        self._var[id(t)] = (t, var)

    def var_or_zero(self, t: Any) -> Tensor | float:
        v = self.var(t)
        return 0.0 if v is None else v

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.suspended or not self._var or not self._any_uncertain(args, kwargs):
            return func(*args, **kwargs)
        fn = RULES.get(func)
        if fn is None:
            out = func(*args, **kwargs)
            if not _carries_value(out):
                return out  # sizes, dtypes, comparisons, indices: no first-order variance
            where = self.module_path[-1] if self.module_path else "<top level>"
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise UnsupportedOperationError(
                f"operation {name} received an uncertain input in module {where!r} and has no "
                "variance rule; GAPA will not drop the variance silently. Place the GAPA layer "
                "after this operation, or add a rule with gapa.propagation.rule()."
            )
        out, var = fn(self, func, args, kwargs)
        if var is not None:
            self.set_var(out, var)
        return out

    def _any_uncertain(self, args: tuple, kwargs: dict) -> bool:
        flat, _ = tree_flatten((args, kwargs))
        return any(self.var(a) is not None for a in flat)


def _carries_value(out: Any) -> bool:
    flat, _ = tree_flatten(out)
    return any(isinstance(t, Tensor) and t.is_floating_point() for t in flat)


# --- linear maps -------------------------------------------------------------------------------


@rule(F.linear)
def _linear(tr: VarianceTracker, func, args, kwargs):
    x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    if tr.var(weight) is not None:
        raise UnsupportedOperationError("F.linear with an uncertain weight has no variance rule")
    out = func(*args, **kwargs)
    return out, F.linear(tr.var(x), weight.square())


# --- elementwise nonlinearities: delta method, var_out = phi'(mu)^2 var_in ---------------------


def _from_output(derivative: Callable[[Tensor], Tensor]) -> Rule:
    def apply(tr: VarianceTracker, func, args, kwargs):
        var_in = tr.var(args[0])
        out = func(*args, **kwargs)
        return out, derivative(out).square() * var_in

    return apply


_tanh = _from_output(lambda y: 1.0 - y.square())
_sigmoid = _from_output(lambda y: y * (1.0 - y))
rule(torch.tanh, Tensor.tanh, F.tanh)(_tanh)
rule(torch.sigmoid, Tensor.sigmoid, F.sigmoid)(_sigmoid)


@rule(
    F.relu, torch.relu, Tensor.relu, F.relu_, torch.relu_, Tensor.relu_,
    F.gelu, F.silu, F.elu, F.leaky_relu, F.softplus, F.mish, F.selu, F.celu, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.relu6, F.logsigmoid, F.softsign, F.tanhshrink,
)
def _elementwise(tr: VarianceTracker, func, args, kwargs):
    """Any elementwise function: its slope at the mean by autograd (the gradient of the sum of
    an elementwise map), taken before the call so that in-place variants still see their input."""
    mu, rest = args[0], args[1:]
    with torch.enable_grad():
        leaf = mu.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(func(leaf.clone(), *rest, **kwargs).sum(), leaf)
    var_in = tr.var(mu)
    out = func(*args, **kwargs)
    return out, slope.square() * var_in


# --- sums, products, shapes --------------------------------------------------------------------


def _operands(args, kwargs) -> tuple[Any, Any]:
    return args[0], args[1] if len(args) > 1 else kwargs.get("other")


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
    var = _square(b) * va + _square(a) * vb + va * vb
    return func(*args, **kwargs), var


@rule(torch.div, Tensor.div, Tensor.__truediv__, Tensor.div_, Tensor.__itruediv__)
def _div(tr: VarianceTracker, func, args, kwargs):
    """First order in numerator and denominator: Va / b^2 + a^2 Vb / b^4."""
    a, b = _operands(args, kwargs)
    if kwargs.get("rounding_mode") is not None:
        raise UnsupportedOperationError(
            f"division with rounding_mode={kwargs['rounding_mode']!r} of an uncertain tensor"
        )
    va, vb = tr.var_or_zero(a), tr.var_or_zero(b)
    b2 = _square(b)
    var = va / b2 + (_square(a) * vb / b2.square() if tr.var(b) is not None else 0.0)
    return func(*args, **kwargs), var


@rule(torch.neg, Tensor.neg, Tensor.__neg__, Tensor.__pos__, torch.positive)
def _neg(tr: VarianceTracker, func, args, kwargs):
    return func(*args, **kwargs), tr.var(args[0])


def _square(x: Any) -> Any:
    return x.square() if isinstance(x, Tensor) else x * x


@rule(
    Tensor.view, Tensor.reshape, torch.reshape, torch.flatten, Tensor.flatten, Tensor.unflatten,
    torch.permute, Tensor.permute, torch.transpose, Tensor.transpose, Tensor.t, torch.t,
    Tensor.contiguous, Tensor.clone, torch.clone, Tensor.squeeze, torch.squeeze,
    Tensor.unsqueeze, torch.unsqueeze, Tensor.__getitem__, Tensor.expand, Tensor.to,
    Tensor.float, Tensor.double, Tensor.detach, torch.detach, Tensor.view_as, Tensor.reshape_as,
)
def _same_on_variance(tr: VarianceTracker, func, args, kwargs):
    """Rearrangements and copies: the same operation applied to the variance."""
    return func(*args, **kwargs), func(tr.var(args[0]), *args[1:], **kwargs)


@rule(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _dropout(tr: VarianceTracker, func, args, kwargs):
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    if training:
        raise UnsupportedOperationError(
            "dropout is active (training mode) on an uncertain tensor; call model.eval() first"
        )
    return func(*args, **kwargs), tr.var(args[0])


def supported_operations() -> Iterator[str]:
    """Names of the operations with a variance rule."""
    for f in RULES:
        yield getattr(f, "__qualname__", None) or getattr(f, "__name__", repr(f))
