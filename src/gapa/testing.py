"""Test a variance rule the way GAPA tests its own: against the Jacobian of the operation.

A rule claims the first-order diagonal ``diag(J diag(v) J^T)``, i.e. ``sum_j J_ij^2 v_j`` with
``J`` the Jacobian at the mean. For a linear operation (a convolution, a pooling, a copy) that
is the exact output variance; for a nonlinear one it is the delta-method variance, which is
what the rule computes too. So :func:`assert_rule_exact` is a tight check at any variance, not a
Monte-Carlo estimate::

    import gapa.testing

    x = torch.randn(3, 4, dtype=torch.float64)
    gapa.testing.assert_rule_exact(torch.atan, x, rules={torch.atan: atan_rule})
    gapa.testing.assert_rule_exact(my_module.double().eval(), x)

The reference comes from ``torch.autograd.functional.jacobian`` over every entry of the inputs
(batch included: keep inputs tiny), in the inputs' dtype: give float64 inputs (and float64
modules) for the default tolerance. This module does not need pytest.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .propagation import MODULE_RULES, MODULE_RULES_BY_NAME, RULES, VarianceTracker, tracking
from .propagation.engine import operation_name

Tensor = torch.Tensor

__all__ = ["assert_rule_exact", "jacobian_variance", "rules_restored"]


def assert_rule_exact(
    func_or_module: Callable | nn.Module,
    *args: Any,
    var: Tensor | Sequence[Tensor | None] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    rules: Mapping[Callable | type | str, Callable] | None = None,
    seed: int = 0,
) -> Tensor | tuple[Tensor | None, ...]:
    """Assert that the tracked variance of ``func_or_module(*args)`` is the Jacobian reference.

    Propagates ``N(args[0], diag(var))`` through ``func_or_module(*args)`` as
    :func:`gapa.propagate` does (the same tracker, module rules and per-call ``rules``), and
    asserts that the output variance is ``sum_j J_ij^2 v_j``. Tuple outputs (``split``, pools
    with ``return_indices``) are compared output by output; a floating output without a
    variance counts as zero variance. Also asserts that the tracked outputs equal the plain
    call's bit for bit. ``func_or_module`` must not modify its inputs (clone first).

    Parameters
    ----------
    func_or_module : callable or nn.Module
        The operation or module under test.
    *args : Any
        Its arguments, the uncertain one first.
    var : torch.Tensor or sequence of (torch.Tensor or None) or None, default None
        ``args[0]``'s variance (random in ``[0.5, 1.5)``, drawn in float64 from ``seed``, when
        not given), or one entry per argument (None for a deterministic one) to make several
        arguments uncertain.
    rtol : float or None, default None
        Relative tolerance; ``None``: 1e-10 in float64, 1e-4 in float32, 1e-2 in half
        precision.
    atol : float or None, default None
        Absolute tolerance; ``None``: ``rtol`` times the largest reference entry.
    rules : Mapping or None, default None
        Rules for this call only, as for :func:`gapa.propagate`.
    seed : int, default 0
        Seed of the random default ``var``.

    Returns
    -------
    torch.Tensor or None or tuple
        The tracked variance of the output (a tuple for tuple outputs; None where an output
        carries none).

    Raises
    ------
    AssertionError
        Naming the operation, the largest absolute and relative differences and where they
        are; also when the tracked outputs differ from the plain call's.
    InputError
        When no argument is uncertain, a variance does not fit its argument, or the operation
        returns no floating tensor.
    """
    variances = _variances(args, var, seed)
    name = _name(func_or_module)
    outs, out_vars = _tracked(func_or_module, args, variances, rules)
    with torch.no_grad():
        plain = _as_tuple(func_or_module(*args))
    if len(plain) != len(outs) or not all(
            _same(o, p) for o, p in zip(outs, plain, strict=True)):
        raise AssertionError(
            f"{name}: the outputs under the variance tracker differ from the plain call's; a "
            "rule must return func(*args, **kwargs) itself")
    got, shown = [], []
    for k, (o, v) in enumerate(zip(outs, out_vars, strict=True)):
        if not _floating(o):
            continue
        if v is not None and (v.shape != o.shape or v.dtype != o.dtype):
            raise AssertionError(
                f"{name}: the variance of output {k} is {tuple(v.shape)} {v.dtype}, its output "
                f"{tuple(o.shape)} {o.dtype}")
        got.append(torch.zeros_like(o) if v is None else v)
        shown.append(k)
    if not got:
        raise InputError(f"{name} returned no floating tensor: there is no variance to check")
    want = _reference(func_or_module, args, variances)
    _compare(name, shown, got, want, rtol, atol)
    return out_vars[0] if len(outs) == 1 else tuple(out_vars)


def jacobian_variance(
    func_or_module: Callable | nn.Module, *args: Any, var: Tensor | Sequence[Tensor | None]
) -> Tensor | tuple[Tensor | None, ...]:
    """Return the reference of :func:`assert_rule_exact`, ``sum_j J_ij^2 v_j``.

    Parameters
    ----------
    func_or_module : callable or nn.Module
        The operation or module.
    *args : Any
        Its arguments, the uncertain one first.
    var : torch.Tensor or sequence of (torch.Tensor or None)
        As for :func:`assert_rule_exact`.

    Returns
    -------
    torch.Tensor or None or tuple
        The reference variance of each floating output of ``func_or_module(*args)`` (None for
        the others); a tuple for several outputs.

    Raises
    ------
    InputError
        When no argument is uncertain or a variance does not fit its argument.
    """
    variances = _variances(args, var, 0)
    with torch.no_grad():
        outs = _as_tuple(func_or_module(*args))
    refs = iter(_reference(func_or_module, args, variances))
    result = tuple(next(refs) if _floating(o) else None for o in outs)
    return result[0] if len(result) == 1 else result


@contextlib.contextmanager
def rules_restored() -> Iterator[None]:
    """Undo, on exit, every rule registered or overridden inside; for tests that register rules.

    The registries restored are ``RULES``, ``MODULE_RULES`` and ``MODULE_RULES_BY_NAME``.
    """
    saved = [(registry, dict(registry)) for registry in (RULES, MODULE_RULES,
                                                         MODULE_RULES_BY_NAME)]
    try:
        yield
    finally:
        for registry, entries in saved:
            registry.clear()
            registry.update(entries)


# --- helpers -------------------------------------------------------------------------------------


def _variances(args: tuple, var: Any, seed: int) -> list[Tensor | None]:
    """One variance (or None) per argument, in that argument's dtype and device."""
    if not args:
        raise InputError("give the arguments of the operation, the uncertain one first")
    if var is None or isinstance(var, Tensor):
        var = [var] + [None] * (len(args) - 1)
        if var[0] is None and _floating(args[0]):
            g = torch.Generator().manual_seed(seed)
            var[0] = 0.5 + torch.rand(args[0].shape, generator=g, dtype=torch.float64)
    var = list(var)
    if len(var) != len(args):
        raise InputError(f"var has {len(var)} entries for {len(args)} arguments")
    out: list[Tensor | None] = []
    for i, (a, v) in enumerate(zip(args, var, strict=True)):
        if v is None:
            out.append(None)
            continue
        if not _floating(a) or not isinstance(v, Tensor) or v.shape != a.shape:
            raise InputError(
                f"argument {i} is given a variance, so it must be a floating tensor of the "
                f"variance's shape ({_describe(a)} and {_describe(v)})")
        if bool((v < 0).any()) or not bool(torch.isfinite(v).all()):
            raise InputError(f"the variance of argument {i} must be finite and non-negative")
        out.append(v.to(dtype=a.dtype, device=a.device))
    if all(v is None for v in out):
        raise InputError("no argument is uncertain: give args[0] a floating tensor, or var")
    return out


def _tracked(fn, args, variances, rules) -> tuple[tuple, list[Tensor | None]]:
    tracker = VarianceTracker(rules)
    for a, v in zip(args, variances, strict=True):
        if v is not None:
            tracker.set_var(a, v)
    # a module runs as gapa.propagate runs it (hooks, module rules); a function at top level
    with torch.no_grad(), tracking(fn, tracker) if isinstance(fn, nn.Module) else tracker:
        outs = _as_tuple(fn(*args))
    return outs, [tracker.var(o) if _floating(o) else None for o in outs]


def _reference(fn, args, variances) -> list[Tensor]:
    """``sum_j J_ij^2 v_j`` per floating output, J over the uncertain arguments."""
    idx = [i for i, v in enumerate(variances) if v is not None]
    shapes: list[torch.Size] = []

    def flat(*uncertain: Tensor) -> Tensor:
        full = list(args)
        for i, u in zip(idx, uncertain, strict=True):
            full[i] = u
        outs = [o for o in _as_tuple(fn(*full)) if _floating(o)]
        shapes[:] = [o.shape for o in outs]
        return torch.cat([o.reshape(-1) for o in outs])

    inputs = tuple(args[i].detach() for i in idx)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
        try:
            jac = torch.autograd.functional.jacobian(flat, inputs, vectorize=True)
        except (RuntimeError, NotImplementedError):  # vmap cannot batch an operation:
            jac = torch.autograd.functional.jacobian(flat, inputs)  # one backward per output
    total = sum(j.reshape(j.shape[0], -1).square() @ variances[i].reshape(-1)
                for j, i in zip(jac, idx, strict=True))
    return [part.reshape(s) for part, s in
            zip(total.split([s.numel() for s in shapes]), shapes, strict=True)]


def _compare(name: str, which: list[int], got: list[Tensor], want: list[Tensor],
             rtol: float | None, atol: float | None) -> None:
    g = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in got])
    w = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in want])
    if rtol is None:
        rtol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(want[0].dtype, 1e-2)
    if atol is None:
        atol = rtol * float(w.abs().max()) if w.numel() else 0.0
    diff = (g - w).abs()
    bad = ~(diff <= atol + rtol * w.abs())  # NaN is bad
    if not bool(bad.any()):
        return
    rel = (diff / w.abs()).nan_to_num(nan=float("inf"), posinf=float("inf"))
    rel = torch.where(diff == 0, 0.0, rel)
    abs_at = int(diff.nan_to_num(nan=float("inf")).argmax())
    rel_at = int(rel.argmax())
    raise AssertionError(
        f"the variance of {name} is not the Jacobian reference sum_j J_ij^2 v_j: "
        f"{int(bad.sum())} of {bad.numel()} entries differ (rtol={rtol:.3g}, atol={atol:.3g}); "
        f"largest absolute difference {float(diff[abs_at]):.6g} at "
        f"{_where(abs_at, which, want, g, w)}; largest relative difference "
        f"{float(rel[rel_at]):.6g} at {_where(rel_at, which, want, g, w)}")


def _where(flat: int, which: list[int], want: list[Tensor], g: Tensor, w: Tensor) -> str:
    """Output ``k`` index ``(i, j, ...)`` of a flat position, with both values."""
    start = 0
    for k, t in zip(which, want, strict=True):
        if flat < start + t.numel():
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat - start),
                                                              t.shape))
            place = f"index {index}" if len(want) == 1 else f"output {k} index {index}"
            return f"{place} (rule {float(g[flat]):.10g}, reference {float(w[flat]):.10g})"
        start += t.numel()
    raise AssertionError("position outside the outputs")  # unreachable


def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def _floating(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b)


def _describe(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"{tuple(t.shape)} {t.dtype}"
    return type(t).__name__


def _name(fn: Any) -> str:
    return type(fn).__name__ if isinstance(fn, nn.Module) else operation_name(fn)
