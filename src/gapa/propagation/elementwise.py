"""Elementwise nonlinearities by the delta method, and dropout in eval mode (the identity).

The delta method gives ``var_out = phi'(mu)^2 var_in``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .engine import Rule, Tensor, VarianceTracker, aliases, arg, module_rule, rule


def _from_output(derivative: Callable[[Tensor], Tensor]) -> Rule:
    def apply(tr: VarianceTracker, func, args, kwargs):
        var_in = tr.var(args[0])
        out = func(*args, **kwargs)
        return out, derivative(out).square() * var_in

    return apply


rule(*aliases("tanh"))(_from_output(lambda y: 1.0 - y.square()))
rule(*aliases("sigmoid"))(_from_output(lambda y: y * (1.0 - y)))


def slope(func: Callable, mu: Tensor, *rest, **kwargs) -> Tensor:
    """Return ``func'(mu)`` of an elementwise ``func`` by autograd (the gradient of the sum).

    It is taken on a copy, so that in-place variants still see their input afterwards;
    ``rest`` and ``kwargs`` are passed on to ``func``.
    """
    with torch.enable_grad():
        leaf = mu.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(func(leaf.clone(), *rest, **kwargs).sum(), leaf)
    return grad


@rule(*aliases(
    "relu", "gelu", "silu", "elu", "leaky_relu", "softplus", "mish", "selu", "celu", "hardtanh",
    "hardswish", "hardsigmoid", "relu6", "logsigmoid", "softsign", "tanhshrink",
))
def _elementwise(tr: VarianceTracker, func, args, kwargs):
    """Any elementwise function: its slope at the mean by autograd."""
    mu, rest = args[0], args[1:]
    g = slope(func, mu, *rest, **kwargs)
    var_in = tr.var(mu)
    out = func(*args, **kwargs)
    return out, g.square() * var_in


@rule(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _dropout(tr: VarianceTracker, func, args, kwargs):
    training = arg(args, kwargs, 2, "training", func is not F.alpha_dropout)
    if training:
        raise tr.unsupported(f"{func.__name__} in training mode (call model.eval() first)")
    return func(*args, **kwargs), tr.var(args[0])


#: The elementwise activation modules of ``transformers.activations``, matched by class name so
#: that transformers stays optional. Several write one activation as a composition of operations
#: on the same input (``0.5 * x * (1 + tanh(...))``), whose function rules would treat the
#: factors as independent; the module rule takes the exact slope of the whole activation.
TRANSFORMERS_ACTIVATIONS = (
    "AccurateGELUActivation", "ClippedGELUActivation", "FastGELUActivation", "GELUActivation",
    "GELUTanh", "LaplaceActivation", "LinearActivation", "MishActivation", "NewGELUActivation",
    "PytorchGELUTanh", "QuickGELUActivation", "ReLUSquaredActivation", "SiLUActivation",
    "SqrtSoftplusActivation", "XIELUActivation",
)


@module_rule(*TRANSFORMERS_ACTIVATIONS)
def _activation_module(tr: VarianceTracker, module, args, out):
    # ``forward``, not ``module(...)``: calling the module would fire its hooks again (GAPA's
    # own, when the module is a GAPA layer, would count a second call of its site)
    return slope(module.forward, args[0]).square() * tr.var(args[0])
