"""The propagation engine: a variance beside every uncertain tensor of one forward pass.

A ``TorchFunctionMode`` (:class:`VarianceTracker`) carries the variances through one unmodified
forward pass. Every torch function the network calls runs exactly as it would without the
tracker (so the mean is the frozen network's output, bit for bit). When an input of a call
carries a variance, the operation's rule computes the variance of its output:
``diag(J diag(var_in) J^T)`` with ``J`` the Jacobian at the mean, units treated as independent.
An operation with an uncertain input and no rule raises
:class:`~gapa.errors.UnsupportedOperationError`: variance is never dropped silently.

Two registries hold the rules:

- :func:`rule` for torch functions (``F.linear``, ``torch.add``, ``Tensor.view``, ...);
- :func:`module_rule` for modules whose exact diagonal is not the composition of their
  operations' rules (a hand-written RMSNorm, a GELU written as ``x * (1 + tanh(...))``): the
  module's forward runs with the function rules paused and the module rule sets the variance of
  its output.

Registering over an existing rule raises :class:`~gapa.errors.ConfigurationError` unless
``override=True``; :func:`aliases` gathers an operation's spellings (``torch.X``, ``Tensor.X``,
``Tensor.X_``, ...). ``VarianceTracker(rules=...)`` (and ``propagate(..., rules=...)``) takes
rules for one pass, ahead of the registries, without changing them.

Writes are followed, not guessed: every variance is stored with the version counter of its
tensor. An in-place operation (``x.add_(h)``, ``buf[:, :16] = h``, ``out=``) updates the
variance of the tensor it wrote and of that tensor's base, so every other view of the same
storage reads its variance from the base; a tensor written by anything the tracker did not
see is refused instead of read with a stale variance.

Module hooks act only in the thread that installed them, and the tracker itself is a
thread-local ``TorchFunctionMode``: one thread's tracked pass never touches another thread's
plain forward, and several threads can each run their own tracked pass on one model.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..adapters import output_tensor
from ..errors import ConfigurationError, InputError, UnsupportedOperationError
from ..moments import Moments

Tensor = torch.Tensor
#: A function rule: ``rule(tracker, func, args, kwargs) -> (output, output variance or None)``.
Rule = Callable[["VarianceTracker", Callable, tuple, dict], tuple[Any, Tensor | None]]
#: A module rule: ``rule(tracker, module, args, output) -> output variance``.
ModuleRule = Callable[["VarianceTracker", nn.Module, tuple, Any], Tensor]
#: Registered function rules by torch function (see :func:`rule`).
RULES: dict[Callable, Rule] = {}
#: Registered module rules by module class (see :func:`module_rule`).
MODULE_RULES: dict[type, ModuleRule] = {}
#: Module rules matched by class name, for classes of optional libraries (``transformers``).
MODULE_RULES_BY_NAME: dict[str, ModuleRule] = {}


def rule(*funcs: Callable, override: bool = False) -> Callable[[Rule], Rule]:
    """Register a variance rule for one or several torch functions; use as a decorator.

    A rule is called as ``rule(tracker, func, args, kwargs)`` when at least one argument is
    uncertain, and returns ``(func(*args, **kwargs), variance_of_the_output)``. See
    :mod:`gapa.propagation` for a worked example.

    Parameters
    ----------
    *funcs : callable
        The torch functions the rule is for: every spelling of the operation (aliases,
        methods; see :func:`aliases`).
    override : bool, default False
        Replace the rules these functions already have.

    Returns
    -------
    callable
        The decorator; it registers the rule and returns it unchanged.

    Raises
    ------
    ConfigurationError
        Raised by the decorator when a function already has another rule and ``override`` is
        False.
    """

    def register(fn: Rule) -> Rule:
        keys = dict.fromkeys(funcs, fn)
        _check_free(RULES, keys, override)
        RULES.update(keys)
        return fn

    return register


def module_rule(*classes: type | str, override: bool = False) -> Callable[[ModuleRule], ModuleRule]:
    """Register a whole-module variance rule for one or several classes; use as a decorator.

    The rule is called as ``rule(tracker, module, args, output)`` after the module ran, and
    returns the variance of ``output``.

    Parameters
    ----------
    *classes : type or str
        Module classes, or class names (for classes of optional libraries).
    override : bool, default False
        Replace the rules these classes already have.

    Returns
    -------
    callable
        The decorator; it registers the rule and returns it unchanged.

    Raises
    ------
    ConfigurationError
        Raised by the decorator when a class already has another rule and ``override`` is
        False.
    """

    def register(fn: ModuleRule) -> ModuleRule:
        by_class = {c: fn for c in classes if not isinstance(c, str)}
        by_name = {c: fn for c in classes if isinstance(c, str)}
        _check_free(MODULE_RULES, by_class, override)
        _check_free(MODULE_RULES_BY_NAME, by_name, override)
        MODULE_RULES.update(by_class)
        MODULE_RULES_BY_NAME.update(by_name)
        return fn

    return register


def _check_free(registry: dict, new: dict, override: bool) -> None:
    """Refuse to replace another rule for a key of ``new`` (key -> rule) unless ``override``."""
    if override:
        return
    for key, fn in new.items():
        existing = registry.get(key)
        if existing is not None and existing is not fn:
            raise ConfigurationError(
                f"{_key_name(key)} already has a variance rule, {_rule_name(existing)}; pass "
                "override=True to replace it, or rules={...} to gapa.propagate for one call")


def _key_name(key: Any) -> str:
    if isinstance(key, str):
        return f"module class {key!r}"
    if isinstance(key, type):
        return f"module {key.__module__}.{key.__qualname__}"
    return f"operation {operation_name(key)}"


def _rule_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def aliases(*names: str) -> tuple[Callable, ...]:
    """Return the spellings of the torch operations ``names``, for :func:`rule`.

    ``torch.X``, ``Tensor.X``, ``Tensor.X_``, ``torch.X_``, ``F.X`` and ``F.X_``, those that
    exist, each once. Operators (``Tensor.__add__``, ``__radd__``, ...) are never included:
    list them by hand.

    Parameters
    ----------
    *names : str
        Operation names, such as ``"exp"``.

    Returns
    -------
    tuple of callable
        The spellings, in the order above, name after name.

    Raises
    ------
    ConfigurationError
        When no torch operation has one of the names.

    Examples
    --------
    >>> [operation_name(f) for f in aliases("exp")]
    ['torch.exp', 'Tensor.exp', 'Tensor.exp_', 'torch.exp_']
    """
    found: list[Callable] = []
    for name in names:
        spellings = [getattr(owner, attr, None) for owner, attr in (
            (torch, name), (Tensor, name), (Tensor, f"{name}_"), (torch, f"{name}_"),
            (F, name), (F, f"{name}_"))]
        spellings = list(dict.fromkeys(f for f in spellings if callable(f)))
        if not spellings:
            raise ConfigurationError(f"no torch operation is named {name!r}")
        found += [f for f in spellings if f not in found]  # equal: torch.relu_, F.relu_
    return tuple(found)


def find_module_rule(module: nn.Module, rules: Mapping | None = None) -> ModuleRule | None:
    """Return the module rule of ``module``'s class or its nearest base.

    Parameters
    ----------
    module : nn.Module
        The module.
    rules : Mapping or None, default None
        Module rules by class or class name; they take precedence over the registry.

    Returns
    -------
    ModuleRule or None
        The rule, or None when neither ``rules`` nor the registry has one.
    """
    for by_class, by_name in ((rules or {}, rules or {}), (MODULE_RULES, MODULE_RULES_BY_NAME)):
        for cls in type(module).__mro__:
            fn = by_class.get(cls) or by_name.get(cls.__name__)
            if fn is not None:
                return fn
    return None


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """Return argument ``index`` of a call, or its keyword ``name``.

    This is how a rule reads an argument that may come either way.

    Parameters
    ----------
    args : tuple
        The call's positional arguments.
    kwargs : dict
        The call's keyword arguments.
    index : int
        The argument's position.
    name : str
        The argument's keyword.
    default : Any, default None
        The value when the argument is given neither way.

    Returns
    -------
    Any
        The argument's value.
    """
    return args[index] if len(args) > index else kwargs.get(name, default)


def operation_name(func: Callable) -> str:
    """Return how users spell ``func``: ``torch.add``, ``Tensor.add``, ``F.relu``.

    Parameters
    ----------
    func : callable
        A torch function.

    Returns
    -------
    str
        ``"torch.X"``, ``"Tensor.X"`` or ``"F.X"`` where ``func`` is that attribute, else its
        qualified name, name or ``repr``.
    """
    name = getattr(func, "__name__", None)
    for owner, prefix in ((torch, "torch"), (Tensor, "Tensor"), (F, "F")):
        if name and getattr(owner, name, None) is func:
            return f"{prefix}.{name}"
    return getattr(func, "__qualname__", None) or name or repr(func)


def untracked() -> contextlib.AbstractContextManager:
    """Return a context manager that hides torch code from every ``TorchFunctionMode``.

    GAPA's own arithmetic (GP variances, rules, bookkeeping) must never be tracked, also not by
    a second GAPA around this one.

    Returns
    -------
    contextlib.AbstractContextManager
        Torch code run inside it is seen by no torch function mode.
    """
    return torch._C.DisableTorchFunction()


def version(t: Tensor) -> int | None:
    """Return the version counter of ``t``, bumped by every write into its storage.

    Parameters
    ----------
    t : torch.Tensor
        Any tensor.

    Returns
    -------
    int or None
        The counter; None for an inference tensor, which has none and cannot be written
        outside inference mode.
    """
    with untracked():
        return None if t.is_inference() else t._version


class VarianceTracker(TorchFunctionMode):
    """Carries a variance beside every uncertain tensor of one forward pass.

    Rules read their inputs' variances with :meth:`var` (None: deterministic) or
    :meth:`var_or_zero`, and refuse what they cannot propagate with ``raise``
    :meth:`unsupported`.

    Parameters
    ----------
    rules : Mapping or None, default None
        Torch functions to rules, and module classes (or class names) to module rules, for
        this tracker only: they take precedence over the registries, which stay as they are.

    Raises
    ------
    ConfigurationError
        When a rule is not callable, or a key is neither a torch function nor an
        ``nn.Module`` class or class name.
    """

    def __init__(self, rules: Mapping[Callable | type | str, Callable] | None = None) -> None:
        super().__init__()
        self.rules: dict[Callable, Rule] = {}
        self.module_rules: dict[type | str, ModuleRule] = {}
        for key, fn in (rules or {}).items():
            if not callable(fn):
                raise ConfigurationError(f"the rule given for {_key_name(key)} is not callable: "
                                         f"{fn!r}")
            if isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module)):
                self.module_rules[key] = fn
            elif callable(key) and not isinstance(key, type):
                self.rules[key] = fn
            else:
                raise ConfigurationError(
                    f"rules keys are torch functions or nn.Module classes, got {key!r}")
        #: id(tensor) -> (tensor, variance, the tensor's version when the variance was set)
        self._var: dict[int, tuple[Tensor, Tensor, int | None]] = {}
        #: id(tensor) -> its variance while nothing but its entry holds that variance, so the
        #: next write may update it in place (filling a buffer in a loop stays linear)
        self._own: dict[int, Tensor] = {}
        self._fresh: Tensor | None = None  # the last variance writable() handed out
        self._paused = 0
        self.module_path: list[str] = []
        self._module_rule_active: list[bool] = []

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run GAPA's own torch code without rules and unseen by any other torch function mode.

        For GP variances inside hooks and for module rules; a context manager.
        """
        self._paused += 1
        try:
            with untracked():
                yield
        finally:
            self._paused -= 1

    def var(self, t: Any) -> Tensor | None:
        """Return the variance carried by ``t``, or None when ``t`` is deterministic.

        A view reads its variance from its base when the base was written after the view's
        variance was set.

        Parameters
        ----------
        t : Any
            A tensor; any other object is deterministic.

        Returns
        -------
        torch.Tensor or None
            The variance, or None.

        Raises
        ------
        UnsupportedOperationError
            When ``t`` (or its base) carrying a variance was written by an operation the
            tracker did not see, or is a view the variance cannot follow.
        """
        if not isinstance(t, Tensor) or not self._var:
            return None
        with untracked():
            self._own.pop(id(t), None)  # handed out: no longer written in place
            if t._base is not None:
                self._own.pop(id(t._base), None)
            return self._lookup(t)

    def _entry(self, t: Tensor) -> tuple[Tensor, Tensor, int | None] | None:
        """Return ``t``'s (tensor, variance, version) entry, or None.

        Ids of dead tensors are reused, so the entry must hold ``t`` itself.
        """
        entry = self._var.get(id(t))
        return entry if entry is not None and entry[0] is t else None

    def _lookup(self, t: Tensor) -> Tensor | None:
        entry = self._entry(t)
        if entry is not None and entry[2] == version(t):
            return entry[1]
        base = t._base
        derived = None if base is None else self._current(base)
        if derived is not None:
            return _region(derived, base, t, self)
        if entry is not None:
            raise self._stale(t)
        return None

    def _current(self, t: Tensor) -> Tensor | None:
        entry = self._entry(t)
        if entry is None:
            return None
        if entry[2] != version(t):
            raise self._stale(t)
        return entry[1]

    def _stale(self, t: Tensor) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"a {tuple(t.shape)} tensor carrying variance was modified in place, in module "
            f"{self.where()!r}, by an operation the tracker did not see (a write through .data "
            "or an alias); GAPA will not use a stale variance. Write with ordinary torch "
            "operations, or place the GAPA layer after this write.")

    def set_var(self, t: Tensor, var: Tensor) -> None:
        """Attach ``var`` to ``t``, as a rule computed it from ``t``'s inputs.

        A view's variance is computed from its base's. A view of a deterministic base is a
        write into that base (its other views see it).

        Parameters
        ----------
        t : torch.Tensor
            The tensor.
        var : torch.Tensor
            Its variance.

        Raises
        ------
        UnsupportedOperationError
            When ``t``'s base carries a variance made stale by a write the tracker did not see.
        """
        with untracked():
            base = t._base
            if base is not None and self._current(base) is None and _writable_view(t):
                self._write(t, var, version(t))
                return
            # the tensor is kept alive with its variance so its id cannot be reused in this pass
            self._var[id(t)] = (t, var, version(t))

    def assign(self, t: Tensor, var: Tensor) -> None:
        """Make the values of ``t`` carry ``var`` (a GP variance added, a module rule's result).

        Like a write: the base of a view, and so every other view, sees it.

        Parameters
        ----------
        t : torch.Tensor
            The tensor.
        var : torch.Tensor
            Its new variance.
        """
        with untracked():
            if _writable_view(t):
                self._write(t, var, version(t))
            else:
                self._var[id(t)] = (t, var, version(t))
                self._own.pop(id(t), None)

    def writable(self, t: Tensor) -> Tensor:
        """Return ``t``'s variance for a write rule to update in place.

        The rule returns it as ``t``'s new variance. It is zeros when ``t`` is deterministic,
        and a copy unless nothing but ``t``'s entry holds it.

        Parameters
        ----------
        t : torch.Tensor
            The tensor the rule writes into.

        Returns
        -------
        torch.Tensor
            A variance the rule may modify in place.
        """
        with untracked():
            entry = self._entry(t)
            owned = self._own.pop(id(t), None)
            if owned is not None and entry is not None and entry[1] is owned and \
                    entry[2] == version(t):
                self._fresh = owned
            else:
                v = self.var(t)
                self._fresh = torch.zeros_like(t) if v is None else v.clone()
            return self._fresh

    def _write(self, t: Tensor, var: Tensor | None, before: int | None) -> None:
        """Record that ``t`` was just written and now carries ``var``.

        ``var`` None means deterministic values. ``t``'s base, whose variance is read as it was
        at version ``before``, gets the same region.
        """
        with untracked():
            fresh, self._fresh = self._fresh, None
            if var is None:
                var = torch.zeros_like(t)
            elif var.shape != t.shape:
                var = var.expand(t.shape)
            base = t._base
            if base is not None:
                entry = self._entry(base)
                old = None if entry is None else entry[1]
                if old is not None and entry[2] != before:
                    raise self._stale(base)
                if old is None:
                    laid = torch.empty_strided(base.shape, base.stride(), dtype=var.dtype,
                                               device=var.device).zero_()
                else:  # written in place only while nothing else holds it
                    laid = _laid_like(old, base)
                    if laid is old and self._own.get(id(base)) is not old:
                        laid = old.clone(memory_format=torch.preserve_format)
                _region(laid, base, t, self).copy_(var)
                self._var[id(base)] = (base, laid, version(base))
                self._own[id(base)] = laid
            self._var[id(t)] = (t, var, version(t))
            if base is None and var is fresh:
                self._own[id(t)] = var
            else:
                self._own.pop(id(t), None)

    def var_or_zero(self, t: Any) -> Tensor | float:
        """Return the variance carried by ``t``, or 0.0 when ``t`` is deterministic.

        Parameters
        ----------
        t : Any
            A tensor; any other object is deterministic.

        Returns
        -------
        torch.Tensor or float
            The variance, or 0.0.

        Raises
        ------
        UnsupportedOperationError
            As for :meth:`var`.
        """
        v = self.var(t)
        return 0.0 if v is None else v

    def any_uncertain(self, *objs: Any) -> bool:
        """Return whether any tensor in ``objs`` carries a variance.

        Parameters
        ----------
        *objs : Any
            Objects to search; tuples, lists and dicts are searched inside.

        Returns
        -------
        bool
            True when at least one tensor among them carries a variance.

        Raises
        ------
        UnsupportedOperationError
            As for :meth:`var`.
        """
        if not self._var:
            return False
        flat, _ = tree_flatten(objs)
        with untracked():
            return any(isinstance(a, Tensor) and self._lookup(a) is not None for a in flat)

    def where(self) -> str:
        """Return the running module, for error messages.

        Returns
        -------
        str
            The innermost running module's label, or ``"<top level>"``.
        """
        return self.module_path[-1] if self.module_path else "<top level>"

    def unsupported(self, what: str) -> UnsupportedOperationError:
        """Return the error for an uncertain input that ``what`` cannot propagate.

        The caller raises it: ``raise tracker.unsupported("operation X")``.

        Parameters
        ----------
        what : str
            The operation, as the message names it.

        Returns
        -------
        UnsupportedOperationError
            The error, naming ``what`` and the running module.
        """
        return UnsupportedOperationError(
            f"{what} received an uncertain input in module {self.where()!r} and has no variance "
            "rule; GAPA will not drop the variance silently. Place the GAPA layer after this "
            "operation, or add a rule (gapa.propagation.rule(), or rules={...} for one call)."
        )

    def rule_for(self, func: Callable) -> Rule | None:
        """Return the rule this tracker applies to ``func``: its own, else the registered one.

        Parameters
        ----------
        func : callable
            A torch function.

        Returns
        -------
        Rule or None
            The rule, or None when ``func`` has none.
        """
        return self.rules.get(func) or RULES.get(func)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        """Run ``func`` and, when an argument is uncertain, its rule; attach the variance.

        Torch calls this for every torch function of the tracked pass. A write (in place,
        ``out=``, ``__setitem__``) updates the variance of the tensor written.

        Parameters
        ----------
        func : callable
            The torch function called.
        types : tuple
            The types of the call's tensor-like arguments (unused).
        args : tuple, default ()
            The positional arguments.
        kwargs : dict or None, default None
            The keyword arguments.

        Returns
        -------
        Any
            ``func(*args, **kwargs)``.

        Raises
        ------
        UnsupportedOperationError
            When ``func`` has no rule, receives an uncertain argument and returns a floating
            tensor, or writes into a tensor its rule does not describe.
        """
        kwargs = kwargs or {}
        if self._paused or not self._var or not self.any_uncertain(args, kwargs):
            return func(*args, **kwargs)
        fn = self.rule_for(func)
        if fn is None:
            out = func(*args, **kwargs)
            if not _carries_value(out):
                return out  # sizes, dtypes, comparisons, indices: no first-order variance
            raise self.unsupported(f"operation {operation_name(func)}")
        tensors = _tensors((args, kwargs))
        before = [version(t) for t in tensors]
        out, var = fn(self, func, args, kwargs)
        written = [(t, v) for t, v in zip(tensors, before, strict=True)
                   if version(t) != v or (func is Tensor.__setitem__ and t is args[0])]
        if written:
            self._follow_writes(func, args, out, var, written)
        elif var is not None:
            _attach(self, out, var)
        return out

    def _follow_writes(self, func, args, out, var, written) -> None:
        """Give each tensor ``func`` wrote the variance its rule computed.

        Those are the returned tensor of an in-place or ``out=`` call, or the first argument of
        ``__setitem__``.
        """
        if func is Tensor.__setitem__:
            outs, variances = [args[0]], [var]
        elif isinstance(out, Tensor):
            outs, variances = [out], [var]
        else:
            outs = list(out) if isinstance(out, tuple | list) else []
            variances = [None] * len(outs) if var is None else list(var)
        targets = {}
        for o, v in zip(outs, variances, strict=True):
            for t, b in written:
                if t is o:
                    targets[id(t)] = (t, v, b)
        with untracked():
            storages = {t.untyped_storage().data_ptr() for t, _, _ in targets.values()}
            stray = [t for t, _ in written if t.untyped_storage().data_ptr() not in storages]
        if stray or not targets:
            raise UnsupportedOperationError(
                f"{operation_name(func)} wrote into a {tuple(stray[0].shape) if stray else ''} "
                f"tensor in module {self.where()!r} that its variance rule does not describe; "
                "GAPA will not keep a stale variance")
        for t, v, b in targets.values():
            self._write(t, v, b)


def _tensors(objs: Any) -> list[Tensor]:
    flat, _ = tree_flatten(objs)
    seen: dict[int, Tensor] = {}
    for a in flat:
        if isinstance(a, Tensor):
            seen.setdefault(id(a), a)
    return list(seen.values())


def _writable_view(t: Tensor) -> bool:
    """Return whether ``t`` is a view whose variance can be written into its base's.

    A view whose elements overlap (an expand) cannot be written at all, so its own entry stays
    right.
    """
    return t._base is not None and torch._debug_has_internal_overlap(t) != 1


def _laid_like(var: Tensor, base: Tensor) -> Tensor:
    """``var`` with the strides of ``base``, so that a view's geometry applies to both."""
    with untracked():
        if var.stride() == base.stride() and var.storage_offset() == 0:
            return var
        laid = torch.empty_strided(base.shape, base.stride(), dtype=var.dtype, device=var.device)
        return laid.copy_(var)


def _region(base_var: Tensor, base: Tensor, view: Tensor, tr: VarianceTracker) -> Tensor:
    """Return the entries of ``base_var`` (shaped like ``base``) that its view ``view`` covers."""
    with untracked():
        if view.dtype != base.dtype:
            raise tr.unsupported(f"a view of another dtype ({base.dtype} as {view.dtype})")
        laid = _laid_like(base_var, base)
        try:
            return laid.as_strided(view.shape, view.stride(),
                                   view.storage_offset() - base.storage_offset())
        except RuntimeError as exc:
            raise tr.unsupported(f"a view outside its base's extent ({exc})") from exc


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
def thread_hooks() -> Iterator[Callable[..., None]]:
    """Yield a function that registers forward (pre-)hooks acting only in this thread.

    All are removed on exit. Module hooks are visible to every thread that calls the module, so
    another thread's plain forward (or its own GAPA pass) must find them inert.

    Yields
    ------
    callable
        ``add(module, hook, *, pre=False, **options)``: registers ``hook`` as a forward hook
        (a pre-hook with ``pre=True``) of ``module``, ``options`` passed to the registration.
    """
    owner = threading.get_ident()
    handles = []

    def add(module: nn.Module, hook: Callable, *, pre: bool = False, **options) -> None:
        def local(*args):  # any arity: a removal racing another thread's call may drop kwargs
            return hook(*args) if threading.get_ident() == owner else None

        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        handles.append(register(local, **options))

    try:
        yield add
    finally:
        for h in handles:
            h.remove()


#: torch modules whose no-grad forward takes a fast path (another kernel) unless a torch
#: function mode is active or gradients are on: see :func:`plain_fast_paths`.
FAST_PATH_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


@contextlib.contextmanager
def plain_fast_paths(model: nn.Module, sites: Collection[str],
                     plain: Callable[[tuple, dict], bool]) -> Iterator[None]:
    """Run the :data:`FAST_PATH_MODULES` that nothing uncertain reaches as a prediction runs them.

    Such a module (without a GAPA layer of ``sites`` inside it) whose inputs satisfy
    ``plain(args, kwargs)`` (they carry no variance, need no gradient) runs with no torch
    function mode and no gradients, in this thread: its output, which carries no variance
    either way, is then that of ``model(x)`` under ``torch.no_grad`` bit for bit. Tracked, or
    with gradients on, torch would run another kernel, equal only to rounding.

    Parameters
    ----------
    model : nn.Module
        The network.
    sites : collection of str
        Names of the GAPA layers.
    plain : callable
        ``plain(args, kwargs)``: whether a call's inputs are certain.
    """
    entered: list[contextlib.ExitStack | None] = []

    def before(mod, args, kwargs) -> None:
        stack = None
        if plain(args, kwargs):
            stack = contextlib.ExitStack()
            stack.enter_context(untracked())
            stack.enter_context(torch.no_grad())
        entered.append(stack)

    def after(mod, args, out) -> None:
        stack = entered.pop()
        if stack is not None:
            stack.close()

    with thread_hooks() as add:
        for name, module in model.named_modules():
            if isinstance(module, FAST_PATH_MODULES) and not any(
                    not name or site == name or site.startswith(f"{name}.") for site in sites):
                add(module, before, pre=True, with_kwargs=True)
                add(module, after, always_call=True)
        yield


@contextlib.contextmanager
def tracking(
    model: nn.Module, tracker: VarianceTracker, outputs: list[tuple[str, Any]] | None = None
) -> Iterator[VarianceTracker]:
    """Run ``model``'s forward passes under ``tracker``, in this thread only.

    Keeps ``tracker.module_path`` at the running module (for error messages) and applies the
    module rules.

    Parameters
    ----------
    model : nn.Module
        The network.
    tracker : VarianceTracker
        The tracker to enter.
    outputs : list or None, default None
        When given, ``(module name, output)`` is appended for every module call, in the order
        the calls finish.

    Yields
    ------
    VarianceTracker
        ``tracker``, entered.

    Raises
    ------
    UnsupportedOperationError
        When a module with a module rule is called with an uncertain keyword argument.
    """
    with thread_hooks() as add:
        for name, module in model.named_modules():
            label = f"{name} ({type(module).__name__})" if name else type(module).__name__
            mrule = find_module_rule(module, tracker.module_rules)
            add(module, lambda mod, args, kwargs, label=label, mrule=mrule:
                _enter(tracker, label, mrule, args, kwargs), pre=True, with_kwargs=True)
            add(module, lambda mod, args, out, mrule=mrule: _leave(tracker, mod, mrule, args, out),
                always_call=True)
            if outputs is not None:
                add(module, lambda mod, args, out, name=name: outputs.append((name, out)))
        with tracker:
            yield tracker


def _enter(
    tr: VarianceTracker, label: str, mrule: ModuleRule | None, args: tuple, kwargs: dict
) -> None:
    # every stack gets its entry first: _leave pops them even when this hook raises
    tr.module_path.append(label)
    tr._module_rule_active.append(False)
    ruled = mrule is not None and not tr._paused
    if ruled and tr.any_uncertain(kwargs):
        # module rules read their input from args; the function rules would compose an
        # inexact variance without saying so
        raise tr.unsupported(f"{label} called with an uncertain keyword argument")
    if ruled and tr.any_uncertain(args):
        tr._module_rule_active[-1] = True
        tr._paused += 1


def _leave(tr: VarianceTracker, mod: nn.Module, mrule: ModuleRule | None, args: tuple, out):
    if not tr.module_path:
        return None
    uncertain = tr._module_rule_active.pop()
    if uncertain:
        tr._paused -= 1
    if uncertain and isinstance(out, Tensor):  # not after a failed forward
        with tr.paused():
            tr.assign(out, mrule(tr, mod, args, out))
    tr.module_path.pop()
    return None


def propagate(
    model: nn.Module, mean: Tensor, var: Tensor,
    rules: Mapping[Callable | type | str, Callable] | None = None,
) -> Moments:
    """Push an input with diagonal Gaussian uncertainty ``N(mean, diag(var))`` through ``model``.

    One pass, under ``torch.no_grad``. The output's mean is ``model(mean)`` bit for bit; its
    variance is the first-order diagonal output variance (exact for linear maps).

    Parameters
    ----------
    model : nn.Module
        The network.
    mean : torch.Tensor
        The input's mean, a floating tensor.
    var : torch.Tensor
        The input's variance: finite, non-negative, of ``mean``'s shape, dtype and device.
    rules : Mapping or None, default None
        Torch functions to rules (and module classes to module rules) for this call only,
        taking precedence over the registered ones (see :class:`VarianceTracker`).

    Returns
    -------
    Moments
        The output's mean and variance (zeros where the output does not depend on the input).

    Raises
    ------
    InputError
        When ``mean`` or ``var`` is not a tensor, ``mean`` is not floating, they differ in
        shape, dtype or device, or ``var`` is negative or not finite.
    ConfigurationError
        When ``rules`` is malformed (see :class:`VarianceTracker`).
    UnsupportedOperationError
        When an operation without a variance rule receives an uncertain input.
    """
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
    tracker = VarianceTracker(rules)
    tracker.set_var(mean, var)
    with torch.no_grad(), tracking(model, tracker):
        out = output_tensor(model(mean))
    out_var = tracker.var(out)
    return Moments(out, torch.zeros_like(out) if out_var is None else out_var)


def supported_operations() -> Iterator[str]:
    """Yield the names of the operations and modules with a registered variance rule.

    Yields
    ------
    str
        Operation names (as :func:`operation_name` spells them), then module class names.
    """
    for f in RULES:
        yield operation_name(f)
    for c in MODULE_RULES:
        yield c.__name__
    yield from MODULE_RULES_BY_NAME
