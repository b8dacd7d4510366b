"""A watch on the autograd graph of a forward pass, for ``propagation="jacobian"``.

Jacobian propagation reads ``d y / d h`` at the GAPA outputs ``h`` by backward passes. A network
that detaches a tensor, reads ``.data`` or runs part of its forward under ``torch.no_grad``
cuts that path: autograd then reports a zero (or missing) gradient, and the variance that
flows through the cut would vanish without a word. :class:`GraphWatch` follows every tensor
computed from the GAPA outputs and names the first operation whose floating output left the
graph, so the caller can refuse instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedOperationError
from .engine import Tensor, operation_name, untracked

#: Functions whose output is a constant shaped like their input: no path to cut.
CONSTANTS = frozenset({
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like,
    torch.randn_like, Tensor.new_zeros, Tensor.new_ones, Tensor.new_full, Tensor.new_empty,
    Tensor.new_tensor,
})


class GraphWatch(TorchFunctionMode):
    """Marks the tensors that depend on watched ones and whether their gradient path is cut."""

    def __init__(self) -> None:
        super().__init__()
        #: id -> (tensor, the operation that cut its path from a watched tensor, or None)
        self._state: dict[int, tuple[Tensor, str | None]] = {}

    def watch(self, t: Tensor) -> None:
        """Follow ``t``: the tensors computed from it are marked from now on."""
        with untracked():
            self._state[id(t)] = (t, None)

    def _get(self, t: Any) -> tuple[Tensor, str | None] | None:
        entry = self._state.get(id(t)) if isinstance(t, Tensor) else None
        return entry if entry is not None and entry[0] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        """Run ``func`` and mark its floating outputs that depend on watched tensors.

        Each is marked with the first operation that cut its gradient path: one an input
        inherits, or ``func`` itself when the output does not require grad.
        """
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._state or func in CONSTANTS:
            return out
        with untracked():
            flat, _ = tree_flatten((args, kwargs))
            found = [e for e in map(self._get, flat) if e is not None]
            if not found:
                return out
            cut = next((e[1] for e in found if e[1] is not None), None)
            results, _ = tree_flatten(out)
            if func is Tensor.__setitem__:
                results = [args[0]]
            for o in results:
                if isinstance(o, Tensor) and o.is_floating_point():
                    self._state[id(o)] = (o, cut or (None if o.requires_grad else
                                                     operation_name(func)))
        return out

    def reaches(self, *objs: Any) -> bool:
        """Return whether a tensor among ``objs`` depends on a watched tensor.

        Tuples, lists and dicts are searched inside.
        """
        flat, _ = tree_flatten(objs)
        return any(self._get(t) is not None for t in flat)

    def check(self, y: Tensor) -> None:
        """Refuse an output ``y`` that lost (part of) its gradient path to the watched tensors.

        An output that does not depend on them (and requires grad) passes.

        Raises
        ------
        UnsupportedOperationError
            Naming the operation that cut the path.
        """
        entry = self._get(y)
        if entry is None and y.requires_grad:
            return  # the output does not depend on the GAPA layers: zero variance is right
        cut = "an operation outside torch" if entry is None else entry[1]
        if cut is None:
            return
        raise UnsupportedOperationError(
            f"propagation='jacobian' needs the gradient of the output with respect to the GAPA "
            f"layers, but the network cuts that path ({cut}: a detach, .data, or a part of "
            "forward under torch.no_grad); the variance through it would be dropped. Use "
            "propagation='diagonal', which follows the values, or keep the graph in forward."
        )
