"""Rearrangements and copies: the same operation applied to the variance (exact)."""

from __future__ import annotations

import torch

from .engine import Tensor, VarianceTracker, rule


@rule(
    Tensor.view, Tensor.reshape, torch.reshape, torch.flatten, Tensor.flatten, Tensor.unflatten,
    torch.permute, Tensor.permute, torch.transpose, Tensor.transpose, Tensor.t, torch.t,
    Tensor.contiguous, Tensor.clone, torch.clone, Tensor.squeeze, torch.squeeze,
    Tensor.unsqueeze, torch.unsqueeze, Tensor.__getitem__, Tensor.expand, Tensor.to,
    Tensor.float, Tensor.double, Tensor.detach, torch.detach, Tensor.view_as, Tensor.reshape_as,
)
def _same_on_variance(tr: VarianceTracker, func, args, kwargs):
    return func(*args, **kwargs), func(tr.var(args[0]), *args[1:], **kwargs)
