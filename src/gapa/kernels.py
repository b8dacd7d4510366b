"""Per-unit RBF kernels on a unit's scalar pre-activation, and their label-free hyperparameters.

Each unit ``j`` of a GAPA layer has ``k_j(u, u') = a_j exp(-(u - u')^2 / (2 l_j^2))``. The
lengthscale ``l_j`` and amplitude ``a_j`` come from statistics of the cached pre-activations
(no labels, no gradients); the observation noise of a cached row is ``noise * a_j / n`` where
``n`` is how many training rows the row stands for (1 for a raw cache row, the cluster size for
an inducing point), so dense regions of activation space are more certain than sparse ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .errors import ConfigurationError

#: Random pairs of cached rows whose differences set the lengthscale.
LENGTHSCALE_PAIRS = 20_000
#: Rows per chunk of the activation statistics (bounds their temporaries).
STATS_CHUNK_ROWS = 1 << 16
#: Smallest lengthscale, relative to the unit's pre-activation scale, so constant units stay finite.
MIN_LENGTHSCALE = 1e-6


@dataclass(frozen=True)
class Hyperparameters:
    """Kernel hyperparameters of one GAPA call site (``d`` units)."""

    lengthscale: torch.Tensor  #: (d,) per-unit RBF lengthscale, in pre-activation units
    amplitude: torch.Tensor  #: (d,) per-unit prior variance a_j (variance far from the data)
    noise: float  #: observation noise of one cached row, relative to the amplitude

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        return replace(
            self,
            lengthscale=self.lengthscale.to(device=device, dtype=dtype),
            amplitude=self.amplitude.to(device=device, dtype=dtype),
        )


def pairwise_difference_quantile(
    x: torch.Tensor, q: float, n_pairs: int, generator: torch.Generator
) -> torch.Tensor:
    """Per-column ``q``-quantile of the non-zero ``|x_i - x_j|`` over ``n_pairs`` random pairs
    ``i != j`` (0 for a column without distinct values)."""
    n = len(x)
    i = torch.randint(n, (n_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (n_pairs,), generator=generator)) % n
    diff = (x[i] - x[j]).abs().double()
    # duplicated rows say nothing about the spacing of distinct values: on a cache with many
    # copies the plain quantile is 0 and every new point would sit at the prior variance
    diff[diff == 0] = float("nan")
    return torch.nanquantile(diff, q, dim=0).nan_to_num(0.0).to(x.dtype)


def estimate_hyperparameters(
    pre: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    *,
    lengthscale_quantile: float,
    amplitude_rule: str,
    noise: float,
    generator: torch.Generator,
    n_pairs: int = LENGTHSCALE_PAIRS,
) -> Hyperparameters:
    """Hyperparameters from the cached pre-activations ``pre`` (N x d) of one call site.

    ``lengthscale``: the ``lengthscale_quantile`` of pairwise distances between a unit's cached
    pre-activations, so that a typical neighbour is "close" on the kernel's scale.
    ``amplitude``: ``"variance"`` uses Var(phi(X_j)), the spread the activation actually takes
    over the data; ``"unit"`` uses 1; ``"max1"`` (default) uses max(1, Var(phi(X_j))): a unit
    whose activation barely moves on the training data is still allowed to move off it (on
    flights, with the validation-chosen lengthscale, it beat ``"variance"`` in 5 of 6
    seed/split cases: benchmarks/RESULTS.md).
    """
    if not 0.0 < lengthscale_quantile < 1.0:
        raise ConfigurationError(
            f"lengthscale_quantile must lie in (0, 1), got {lengthscale_quantile}"
        )
    if noise <= 0.0:
        raise ConfigurationError(f"noise must be positive, got {noise}")
    if len(pre) > 1:
        std, act_var = _column_stats(pre, activation)
        lengthscale = pairwise_difference_quantile(pre, lengthscale_quantile, n_pairs, generator)
        lengthscale = torch.maximum(lengthscale, MIN_LENGTHSCALE * std.clamp_min(1.0))
    else:
        one = pre[torch.zeros(1, dtype=torch.long)][0]
        lengthscale, act_var = torch.ones_like(one), torch.zeros_like(one)
    if amplitude_rule == "variance":
        amplitude = act_var.clamp_min(1e-6)
    elif amplitude_rule == "unit":
        amplitude = torch.ones_like(act_var)
    elif amplitude_rule == "max1":
        amplitude = act_var.clamp_min(1.0)
    else:
        raise ConfigurationError(
            f"unknown amplitude_rule {amplitude_rule!r}; use 'variance', 'unit' or 'max1'"
        )
    return Hyperparameters(lengthscale=lengthscale, amplitude=amplitude, noise=float(noise))


def _column_stats(pre, activation) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit standard deviation of ``pre`` and variance of ``activation(pre)`` from float64
    sums over chunks (of a tensor, or the shards of a :class:`gapa.store.StoredRows`), so no
    full-size temporary is made."""
    chunks = pre.split(STATS_CHUNK_ROWS) if isinstance(pre, torch.Tensor) else pre.chunks()
    n = len(pre)
    sums = torch.zeros(4, pre.shape[1], dtype=torch.float64, device=pre.device)
    for chunk in chunks:
        act = activation(chunk.clone()).double()  # clone: an in-place activation must not write
        chunk = chunk.double()
        sums += torch.stack([chunk.sum(0), chunk.square().sum(0), act.sum(0), act.square().sum(0)])
    mean, act_mean = sums[0] / n, sums[2] / n
    var = ((sums[1] - n * mean.square()) / (n - 1)).clamp_min(0)
    act_var = ((sums[3] - n * act_mean.square()) / (n - 1)).clamp_min(0)
    return var.sqrt().to(pre.dtype), act_var.to(pre.dtype)


def override(hp: Hyperparameters, values: dict) -> Hyperparameters:
    """Replace fitted hyperparameters by user values (scalars or per-unit tensors)."""
    unknown = set(values) - {"lengthscale", "amplitude", "noise"}
    if unknown:
        raise ConfigurationError(
            f"unknown hyperparameter(s) {sorted(unknown)}; allowed: lengthscale, amplitude, noise"
        )
    changes: dict = {}
    for name in ("lengthscale", "amplitude"):
        if name in values:
            ref = getattr(hp, name)
            v = torch.as_tensor(values[name], dtype=ref.dtype, device=ref.device)
            if v.dim() == 0:
                v = v.expand_as(ref).clone()
            if v.shape != ref.shape:
                raise ConfigurationError(
                    f"{name} override has shape {tuple(v.shape)}; the layer has "
                    f"{ref.shape[0]} units, so give a scalar or shape ({ref.shape[0]},)"
                )
            if not bool((v > 0).all()):
                raise ConfigurationError(f"{name} override must be positive")
            changes[name] = v
    if "noise" in values:
        if float(values["noise"]) <= 0:
            raise ConfigurationError(f"noise override must be positive, got {values['noise']}")
        changes["noise"] = float(values["noise"])
    return replace(hp, **changes)
