"""The propagation engine: a ``TorchFunctionMode`` that carries a variance beside every uncertain
tensor of one unmodified forward pass.

Every torch function the network calls runs exactly as it would without the tracker (so the mean
is the frozen network's output, bit for bit). When an input of a call carries a variance, the
operation's rule computes the variance of its output: ``diag(J diag(var_in) J^T)`` with ``J`` the
Jacobian at the mean, units treated as independent. An operation with an uncertain input and no
rule raises :class:`~gapa.errors.UnsupportedOperationError`: variance is never dropped silently.

Two registries hold the rules:

- :func:`rule` for torch functions (``F.linear``, ``torch.add``, ``Tensor.view``, ...);
- :func:`module_rule` for modules whose exact diagonal is not the composition of their
  operations' rules (a hand-written RMSNorm, a GELU written as ``x * (1 + tanh(...))``): the
  module's forward runs with the function rules paused and the module rule sets the variance of
  its output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import InputError, UnsupportedOperationError
from ..moments import Moments

Tensor = torch.Tensor
Rule = Callable[["VarianceTracker", Callable, tuple, dict], tuple[Any, Tensor | None]]
ModuleRule = Callable[["VarianceTracker", nn.Module, tuple, Any], Tensor]
RULES: dict[Callable, Rule] = {}
MODULE_RULES: dict[type, ModuleRule] = {}
#: Module rules matched by class name, for classes of optional libraries (``transformers``).
MODULE_RULES_BY_NAME: dict[str, ModuleRule] = {}


def rule(*funcs: Callable) -> Callable[[Rule], Rule]:
    """Register a variance rule for one or several torch functions (aliases, methods).

    A rule is called as ``rule(tracker, func, args, kwargs)`` when at least one argument is
    uncertain, and returns ``(func(*args, **kwargs), variance_of_the_output)``.
    """

    def register(fn: Rule) -> Rule:
        for f in funcs:
            RULES[f] = fn
        return fn

    return register


def module_rule(*classes: type | str) -> Callable[[ModuleRule], ModuleRule]:
    """Register a whole-module variance rule, called as ``rule(tracker, module, args, output)``
    after the module ran; it returns the variance of ``output``. Classes may be given by name."""

    def register(fn: ModuleRule) -> ModuleRule:
        for c in classes:
            if isinstance(c, str):
                MODULE_RULES_BY_NAME[c] = fn
            else:
                MODULE_RULES[c] = fn
        return fn

    return register


def find_module_rule(module: nn.Module) -> ModuleRule | None:
    for cls in type(module).__mro__:
        fn = MODULE_RULES.get(cls) or MODULE_RULES_BY_NAME.get(cls.__name__)
        if fn is not None:
            return fn
    return None


def operation_name(func: Callable) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


class VarianceTracker(TorchFunctionMode):
    """Carries a variance beside every uncertain tensor of one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self._var: dict[int, tuple[Tensor, Tensor]] = {}
        self._paused = 0
        self.module_path: list[str] = []
        self._module_rule_active: list[bool] = []

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run torch code (GP variances inside hooks, module rules) without applying rules."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

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

    def any_uncertain(self, *objs: Any) -> bool:
        flat, _ = tree_flatten(objs)
        return any(self.var(a) is not None for a in flat)

    def where(self) -> str:
        return self.module_path[-1] if self.module_path else "<top level>"

    def unsupported(self, what: str) -> UnsupportedOperationError:
        """The error for an uncertain input that ``what`` cannot propagate."""
        return UnsupportedOperationError(
            f"{what} received an uncertain input in module {self.where()!r} and has no variance "
            "rule; GAPA will not drop the variance silently. Place the GAPA layer after this "
            "operation, or add a rule with gapa.propagation.rule()."
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused or not self._var or not self.any_uncertain(args, kwargs):
            return func(*args, **kwargs)
        fn = RULES.get(func)
        if fn is None:
            out = func(*args, **kwargs)
            if not _carries_value(out):
                return out  # sizes, dtypes, comparisons, indices: no first-order variance
            raise self.unsupported(f"operation {operation_name(func)}")
        out, var = fn(self, func, args, kwargs)
        if var is not None:
            _attach(self, out, var)
        return out


def _attach(tr: VarianceTracker, out: Any, var: Any) -> None:
    """Attach ``var`` to ``out``; tuples and lists of outputs take a sequence of variances."""
    if isinstance(out, Tensor):
        tr.set_var(out, var)
        return
    for o, v in zip(out, var, strict=True):
        if isinstance(o, Tensor) and v is not None:
            tr.set_var(o, v)


def _carries_value(out: Any) -> bool:
    flat, _ = tree_flatten(out)
    return any(isinstance(t, Tensor) and t.is_floating_point() for t in flat)


@contextlib.contextmanager
def tracking(
    model: nn.Module, tracker: VarianceTracker, outputs: list[tuple[str, Any]] | None = None
) -> Iterator[VarianceTracker]:
    """Run ``model``'s forward passes under ``tracker``: keep ``tracker.module_path`` at the
    running module (for error messages) and apply the module rules. With ``outputs``, append
    ``(module name, output)`` for every module call, in the order the calls finish."""
    handles = []
    for name, module in model.named_modules():
        label = f"{name} ({type(module).__name__})" if name else type(module).__name__
        mrule = find_module_rule(module)
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, kwargs, label=label, mrule=mrule:
                _enter(tracker, label, mrule, args, kwargs),
            with_kwargs=True))
        handles.append(module.register_forward_hook(
            lambda mod, args, out, mrule=mrule: _leave(tracker, mod, mrule, args, out),
            always_call=True))
        if outputs is not None:
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: outputs.append((name, out))))
    try:
        with tracker:
            yield tracker
    finally:
        for h in handles:
            h.remove()


def _enter(
    tr: VarianceTracker, label: str, mrule: ModuleRule | None, args: tuple, kwargs: dict
) -> None:
    tr.module_path.append(label)
    ruled = mrule is not None and not tr._paused
    if ruled and tr.any_uncertain(kwargs):
        tr._module_rule_active.append(False)
        # module rules read their input from args; the function rules would compose an
        # inexact variance without saying so
        raise tr.unsupported(f"{label} called with an uncertain keyword argument")
    uncertain = ruled and tr.any_uncertain(args)
    tr._module_rule_active.append(uncertain)
    if uncertain:
        tr._paused += 1


def _leave(tr: VarianceTracker, mod: nn.Module, mrule: ModuleRule | None, args: tuple, out):
    if not tr.module_path:
        return None
    uncertain = tr._module_rule_active.pop()
    if uncertain:
        tr._paused -= 1
    if uncertain and isinstance(out, Tensor):  # not after a failed forward
        with tr.paused():
            tr.set_var(out, mrule(tr, mod, args, out))
    tr.module_path.pop()
    return None


def propagate(model: nn.Module, mean: Tensor, var: Tensor) -> Moments:
    """Push an input with diagonal Gaussian uncertainty ``N(mean, diag(var))`` through ``model``
    in one pass. ``.mean`` is ``model(mean)`` bit for bit; ``.var`` is the first-order diagonal
    output variance (exact for linear maps)."""
    if not isinstance(mean, Tensor) or not isinstance(var, Tensor):
        raise InputError(
            f"mean and var must be tensors, got {type(mean).__name__} and {type(var).__name__}"
        )
    if not mean.is_floating_point():
        raise InputError(
            f"mean is {mean.dtype}: only floating inputs can carry a variance; for a language "
            "model propagate from the embeddings (a module taking inputs_embeds)"
        )
    if mean.shape != var.shape or mean.dtype != var.dtype or mean.device != var.device:
        raise InputError(
            f"mean {tuple(mean.shape)} {mean.dtype} on {mean.device} and var {tuple(var.shape)} "
            f"{var.dtype} on {var.device} must have the same shape, dtype and device"
        )
    if bool((var < 0).any()) or not bool(torch.isfinite(var).all()):
        raise InputError("var must be finite and non-negative")
    tracker = VarianceTracker()
    tracker.set_var(mean, var)
    with torch.no_grad(), tracking(model, tracker):
        out = output_tensor(model(mean))
    out_var = tracker.var(out)
    return Moments(out, torch.zeros_like(out) if out_var is None else out_var)


def output_tensor(out: Any) -> Tensor:
    """The prediction in a model's output: the tensor itself, the ``logits`` of a
    ``transformers`` output, or the first element of a tuple."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise InputError(
        f"the model returned {type(out).__name__}; GAPA needs a Tensor, an output with a "
        "'logits' tensor, or a tuple whose first element is a Tensor"
    )


def supported_operations() -> Iterator[str]:
    """Names of the operations and modules with a variance rule."""
    for f in RULES:
        yield operation_name(f)
    for c in MODULE_RULES:
        yield c.__name__
    yield from MODULE_RULES_BY_NAME
