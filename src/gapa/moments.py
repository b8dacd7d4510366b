"""The (mean, variance) pair that GAPA returns and propagates."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Moments:
    """Mean and diagonal variance of a Gaussian, each shaped like the network's output.

    ``mean`` is the frozen network's own output, bit for bit; ``var`` is the epistemic variance
    GAPA attaches to it.
    """

    mean: torch.Tensor
    var: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        """The standard deviation, ``sqrt(var)``."""
        return self.var.sqrt()

    @staticmethod
    def cat(parts: list[Moments]) -> Moments:
        """Join the moments of consecutive batches into one (along the batch axis)."""
        return Moments(torch.cat([p.mean for p in parts]), torch.cat([p.var for p in parts]))

    def to(self, *args, **kwargs) -> Moments:
        """Return both tensors moved or cast as :meth:`torch.Tensor.to` with these arguments."""
        return Moments(self.mean.to(*args, **kwargs), self.var.to(*args, **kwargs))


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, in one reduction when they are.

    A sum is finite only if every term is, so the elementwise mask is built only when the sum
    is not finite: then either an entry is NaN or Inf, or finite entries overflowed the sum.
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
