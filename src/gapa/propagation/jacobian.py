"""``propagation="jacobian"``: the exact first-order output variance of the GAPA units.

A forward pass with autograd on (the same values, so the mean is unchanged), then one backward
pass per output unit gives ``d y / d h`` at every GAPA output ``h``; the output variance is
``sum_j (d y_c / d h_j)^2 v_j``. The gradients do not depend on the GP, so a lengthscale search
computes them once (:func:`jacobian_parts`) and combines them with each candidate's variances
(:func:`combine_jacobian`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..adapters import output_tensor
from ..capture.hooks import call_sites, require_calls
from ..capture.inputs import Batch
from ..errors import UnsupportedOperationError
from ..moments import Moments
from .engine import plain_fast_paths, untracked, version
from .graph import GraphWatch

#: Per GAPA call: its key, its pre-activation and ``(d y_c / d h)^2`` per output unit ``c``.
Parts = list[tuple[str, torch.Tensor, list[torch.Tensor | None]]]

#: Most output units per input the Jacobian propagation takes (one backward pass each): above
#: it (a language model's vocabulary at every position) it is refused, not left to run for hours.
MAX_JACOBIAN_OUTPUTS = 4096


def jacobian_parts(model: nn.Module, layers: Sequence[str],
                   x: torch.Tensor | Batch) -> tuple[torch.Tensor, Parts]:
    """Run the forward and backward passes of the Jacobian propagation.

    Parameters
    ----------
    model : torch.nn.Module
        The network, already checked by the caller (eval mode, weights of the fit).
    layers : sequence of str
        The GAPA layers.
    x : torch.Tensor or Batch
        The inputs (named inputs as a :class:`gapa.capture.inputs.Batch`), outside inference
        mode.

    Returns
    -------
    mean : torch.Tensor
        The model's output, bit for bit.
    parts : list
        Per GAPA call: its key, its pre-activation and ``(d y_c / d h)^2`` for every output
        unit ``c`` (None where the output does not depend on it).

    Raises
    ------
    UnsupportedOperationError
        More than :data:`MAX_JACOBIAN_OUTPUTS` output units per input, no GAPA layer ran in
        this thread, the network cuts the graph after a GAPA layer, writes
        in place into the tensor an in-place activation returned, or applies one to a view.
    """
    leaves: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    pending: dict[str, torch.Tensor] = {}
    watch = GraphWatch()

    def on_call(key: str, z: torch.Tensor) -> None:
        # a copy: an in-place activation (ReLU(inplace=True)) overwrites z with its output
        with untracked():
            pending[key] = z.detach().clone()

    def on_output(key: str, out: torch.Tensor) -> torch.Tensor:
        # gradients are taken with respect to the output itself, so that a later GAPA
        # layer does not cut an earlier one's path; only an output outside the graph
        # (frozen parameters) becomes a leaf, with the same values. The network gets a
        # copy: a later in-place write into it does not change what is differentiated.
        with untracked():
            if out._base is not None:
                raise UnsupportedOperationError(
                    f"the GAPA layer {key!r} wrote its output into a view of another tensor "
                    "(an in-place activation on a slice): propagation='jacobian' cannot "
                    "follow what the network reads through that tensor; use "
                    "propagation='diagonal' or an out-of-place activation")
            leaf = out if out.requires_grad else out.detach().requires_grad_(True)
            passed = leaf.clone()
            leaves.append((key, pending.pop(key), leaf))
            written.append((key, leaf, version(leaf)))
        watch.watch(leaf)
        watch.watch(passed)
        return passed

    written: list[tuple[str, torch.Tensor, int | None]] = []
    with torch.enable_grad():  # also for the backward passes
        with call_sites(model, layers, on_call, on_output), watch, plain_fast_paths(
                model, layers, lambda args, kwargs: not watch.reaches(args, kwargs)):
            y = output_tensor(Batch(x).run(model))
        mean = y.detach()
        require_calls([key for key, _, _ in leaves], layers)
        for key, leaf, seen in written:
            if version(leaf) != seen:
                raise UnsupportedOperationError(
                    f"the network wrote in place into the output of the GAPA layer {key!r} "
                    "(through the tensor the activation was applied to): "
                    "propagation='jacobian' would differentiate the written values; use "
                    "propagation='diagonal'")
        watch.check(y)
        if not y.requires_grad:  # the output does not depend on the GAPA layers
            return mean, []
        rows = y.reshape(y.shape[0], -1)
        if rows.shape[1] > MAX_JACOBIAN_OUTPUTS:
            raise UnsupportedOperationError(
                f"propagation='jacobian' takes one backward pass per output unit: "
                f"{rows.shape[1]:,} per input here (outputs of shape {tuple(y.shape)}), above "
                f"the limit of {MAX_JACOBIAN_OUTPUTS:,} (gapa.propagation.jacobian."
                "MAX_JACOBIAN_OUTPUTS); use propagation='diagonal' (one forward pass)")
        inputs = [out for _, _, out in leaves]
        squares = [[] for _ in leaves]
        for c in range(rows.shape[1]):
            grads = torch.autograd.grad(rows[:, c].sum(), inputs, retain_graph=True,
                                        allow_unused=True)
            for g, sq in zip(grads, squares, strict=True):
                sq.append(None if g is None else g.square())
    return mean, [(key, z, sq) for (key, z, _), sq in zip(leaves, squares, strict=True)]


def combine_jacobian(mean: torch.Tensor, parts: Parts,
                     site_variance: Callable[[str, torch.Tensor], torch.Tensor]) -> Moments:
    """Combine the Jacobian parts with the GP variances ``site_variance(key, z)``.

    The variance of output unit ``c`` is ``sum_j (d y_c / d h_j)^2 v_j``.

    Parameters
    ----------
    mean : torch.Tensor
        The output of :func:`jacobian_parts`.
    parts : list
        Its parts.
    site_variance : callable
        The GP variance of a call site at a pre-activation (:meth:`gapa.GAPA.site_variance`).

    Returns
    -------
    Moments
        ``mean`` and the first-order output variance.
    """
    rows = mean.reshape(mean.shape[0], -1)
    var = torch.zeros_like(rows)
    with torch.no_grad(), untracked():
        variances = [site_variance(key, z) for key, z, _ in parts]
        for c in range(rows.shape[1]):
            for (_, _, squares), v in zip(parts, variances, strict=True):
                if squares[c] is not None:
                    var[:, c] += (squares[c] * v).reshape(v.shape[0], -1).sum(1)
    return Moments(mean, var.reshape(mean.shape))
