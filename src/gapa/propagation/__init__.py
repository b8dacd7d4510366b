"""Diagonal moment propagation through an unmodified PyTorch forward pass.

:func:`propagate` pushes ``N(mean, diag(var))`` through a model; :class:`VarianceTracker` is the
engine (see :mod:`gapa.propagation.engine`); each other module of this package registers the
rules of one family of operations.

Writing a rule. A rule is called as ``fn(tracker, func, args, kwargs)`` when an argument of
``func`` carries a variance; it returns ``func``'s own output and that output's variance,
``diag(J diag(v) J^T)`` at the mean (the delta method, ``f'(x)^2 v``, for an elementwise ``f``).
It reads arguments with :func:`arg`, their variances with ``tracker.var`` (None when
deterministic) or ``tracker.var_or_zero``, and refuses what it cannot do with
``raise tracker.unsupported("what")``::

    @gapa.propagation.rule(*gapa.propagation.aliases("atan"))  # torch.atan, Tensor.atan, ...
    def atan_rule(tracker, func, args, kwargs):
        x = gapa.propagation.arg(args, kwargs, 0, "input")
        var = tracker.var(x) / (1 + x.square()).square()  # atan'(x)^2 v, before an in-place atan_
        return func(*args, **kwargs), var

Registering an operation that already has a rule raises
:class:`~gapa.errors.ConfigurationError` unless ``override=True``; ``gapa.propagate(model,
mean, var, rules={torch.atan: atan_rule})`` uses a rule for one call without registering it.
:func:`module_rule` does the same for a whole module (``fn(tracker, module, args, output)``
returns the output's variance). :func:`gapa.testing.assert_rule_exact` checks a rule against
the Jacobian.
"""

from . import (  # noqa: F401  (each registers the rules of one family of operations)
    arithmetic,
    attention,
    elementwise,
    joins,
    linear,
    normalisation,
    pooling,
    reductions,
    shapes,
    unary,
    writes,
)
from .engine import (
    MODULE_RULES,
    MODULE_RULES_BY_NAME,
    RULES,
    ModuleRule,
    Rule,
    VarianceTracker,
    aliases,
    arg,
    module_rule,
    propagate,
    rule,
    supported_operations,
    tracking,
)

__all__ = [
    "MODULE_RULES",
    "MODULE_RULES_BY_NAME",
    "RULES",
    "ModuleRule",
    "Rule",
    "VarianceTracker",
    "aliases",
    "arg",
    "module_rule",
    "propagate",
    "rule",
    "supported_operations",
    "tracking",
]
