"""Diagonal moment propagation through an unmodified PyTorch forward pass.

:func:`propagate` pushes ``N(mean, diag(var))`` through a model; :class:`VarianceTracker` is the
engine (see :mod:`gapa.propagation.engine`); each other module of this package registers the
rules of one family of operations.
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
    RULES,
    VarianceTracker,
    module_rule,
    propagate,
    rule,
    supported_operations,
    tracking,
)

__all__ = [
    "MODULE_RULES",
    "RULES",
    "VarianceTracker",
    "module_rule",
    "propagate",
    "rule",
    "supported_operations",
    "tracking",
]
