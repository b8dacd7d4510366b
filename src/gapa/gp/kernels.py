"""Per-unit RBF kernels on a unit's scalar pre-activation, and their label-free hyperparameters.

Each unit ``j`` of a GAPA layer has ``k_j(u, u') = a_j exp(-(u - u')^2 / (2 l_j^2))``. The
lengthscale ``l_j`` and amplitude ``a_j`` come from statistics of the cached pre-activations
(no labels, no gradients); the observation noise of a cached row is ``noise * a_j / n`` where
``n`` is how many training rows the row stands for (1 for a raw cache row, the cluster size for
an inducing point), so dense regions of activation space are more certain than sparse ones.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np
import torch

from ..errors import ConfigurationError, parse_enum
from .likelihood import marginal_likelihood_fit

#: Random pairs of cached rows whose differences set the lengthscale.
LENGTHSCALE_PAIRS = 20_000
#: Rows per chunk of the activation statistics (bounds their temporaries).
STATS_CHUNK_ROWS = 1 << 16
#: Smallest lengthscale, relative to the unit's pre-activation scale, so constant units stay finite.
MIN_LENGTHSCALE = 1e-6
#: The settings a ``hyperparameters=`` override may give, per layer or call site.
OVERRIDABLE = ("lengthscale", "amplitude", "noise_ratio")


class AmplitudeRule(str, Enum):
    """The label-free prior variance ``a_j`` of each unit (see :func:`estimate_hyperparameters`)."""

    VARIANCE = "variance"
    """The variance of the unit's activation over the cache."""
    UNIT = "unit"
    """1 for every unit."""
    MAX1 = "max1"
    """The larger of 1 and the activation's variance (the default)."""
    MARGINAL_LIKELIHOOD = "marginal_likelihood"
    """The amplitude under which the unit's activation is most probable as a draw of the GP, at
    the unit's lengthscale (:mod:`gapa.gp.likelihood`)."""


class LengthscaleRule(str, Enum):
    """How each unit's lengthscale ``l_j`` is set (see :func:`estimate_hyperparameters`)."""

    QUANTILE = "quantile"
    """The ``lengthscale_quantile`` of pairwise distances between cached pre-activations (the
    default)."""
    MARGINAL_LIKELIHOOD = "marginal_likelihood"
    """The lengthscale under which the unit's activation over a subsample of the cache is most
    probable as a draw of the GP, the amplitude profiled out (:mod:`gapa.gp.likelihood`)."""


@dataclass(frozen=True)
class Hyperparameters:
    """Kernel hyperparameters of one GAPA call site (``d`` units)."""

    lengthscale: torch.Tensor  #: (d,) per-unit RBF lengthscale, in pre-activation units
    amplitude: torch.Tensor  #: (d,) per-unit prior variance a_j (variance far from the data)
    noise: float  #: observation noise of one cached row, relative to the amplitude

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Return a copy with the lengthscale and amplitude on ``device`` in ``dtype``."""
        return replace(
            self,
            lengthscale=self.lengthscale.to(device=device, dtype=dtype),
            amplitude=self.amplitude.to(device=device, dtype=dtype),
        )


@dataclass(frozen=True)
class ColumnStats:
    """Per-unit statistics of a cache (``d`` units), from one pass over its rows."""

    lo: torch.Tensor  #: (d,) smallest cached value, in the cache's dtype (exact)
    hi: torch.Tensor  #: (d,) largest cached value (exact)
    std: torch.Tensor  #: (d,) standard deviation of the pre-activation
    act_var: torch.Tensor  #: (d,) variance of the activation of the pre-activation


def pairwise_difference_quantile(
    x: torch.Tensor, q: float, n_pairs: int, generator: torch.Generator
) -> torch.Tensor:
    """Return the per-column ``q``-quantile of the non-zero ``|x_i - x_j|`` over random pairs.

    Parameters
    ----------
    x : Tensor
        Rows (N x d), N >= 2.
    q : float
        The quantile, in (0, 1].
    n_pairs : int
        How many random pairs ``i != j`` to draw.
    generator : torch.Generator
        Draws the pairs.

    Returns
    -------
    Tensor
        (d,) in ``x``'s dtype; 0 for a column without distinct values.
    """
    n = len(x)
    i = torch.randint(n, (n_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (n_pairs,), generator=generator)) % n
    # one contiguous row per unit: nanquantile along the last dimension is about 5x faster
    # than along the first, with the same result
    diff = (x[i] - x[j]).abs().double().T.contiguous()
    # duplicated rows say nothing about the spacing of distinct values: on a cache with many
    # copies the plain quantile is 0 and every new point would sit at the prior variance
    diff[diff == 0] = float("nan")
    return torch.nanquantile(diff, q, dim=1).nan_to_num(0.0).to(x.dtype)


def estimate_hyperparameters(
    pre: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    *,
    lengthscale_quantile: float,
    amplitude_rule: AmplitudeRule | str,
    noise: float,
    generator: torch.Generator,
    n_pairs: int = LENGTHSCALE_PAIRS,
    stats: ColumnStats | None = None,
    lengthscale_rule: LengthscaleRule | str = LengthscaleRule.QUANTILE,
) -> Hyperparameters:
    """Estimate the kernel hyperparameters of one call site from its cached pre-activations.

    ``lengthscale``: the ``lengthscale_quantile`` of pairwise distances between a unit's cached
    pre-activations, so that a typical neighbour is "close" on the kernel's scale (floored at
    :data:`MIN_LENGTHSCALE` times the larger of 1 and the unit's standard deviation).
    ``amplitude``: ``"variance"`` uses Var(phi(X_j)), the spread the activation actually takes
    over the data; ``"unit"`` uses 1; ``"max1"`` (default) uses max(1, Var(phi(X_j))): a unit
    whose activation barely moves on the training data is still allowed to move off it.
    ``"marginal_likelihood"`` (for either) maximises the GP's marginal likelihood of the
    unit's activations on a subsample of the cache (:mod:`gapa.gp.likelihood`).
    A single cached row gives lengthscale 1 and activation variance 0.

    Parameters
    ----------
    pre : Tensor or StoredRows
        The cached pre-activations (N x d).
    activation : callable
        The site's activation ``phi``.
    lengthscale_quantile : float
        In (0, 1].
    amplitude_rule : AmplitudeRule or str
        See :class:`AmplitudeRule`.
    noise : float
        Observation noise of one cached row, relative to the amplitude; finite and > 0.
    generator : torch.Generator
        Draws the pairs of rows.
    n_pairs : int
        Pairs of rows whose differences set the lengthscale.
    stats : ColumnStats, optional
        :func:`column_stats` of ``pre``, when the caller has them already (one pass over a
        store fewer).
    lengthscale_rule : LengthscaleRule or str
        See :class:`LengthscaleRule`.

    Returns
    -------
    Hyperparameters

    Raises
    ------
    ConfigurationError
        For a quantile outside (0, 1], an unknown ``amplitude_rule`` or ``lengthscale_rule``,
        or a ``noise`` that is not a finite number > 0.
    """
    check_quantile(lengthscale_quantile)
    amplitude_rule = parse_enum(AmplitudeRule, amplitude_rule, "amplitude_rule")
    lengthscale_rule = parse_enum(LengthscaleRule, lengthscale_rule, "lengthscale_rule")
    noise = check_positive("noise", noise)
    ml_amplitude = None
    if len(pre) > 1:
        stats = stats if stats is not None else column_stats(pre, activation)
        act_var = stats.act_var
        floor = MIN_LENGTHSCALE * stats.std.clamp_min(1.0)
        if lengthscale_rule == "marginal_likelihood":
            lengthscale, ml_amplitude = marginal_likelihood_fit(
                pre, activation, stats.std, noise=noise, generator=generator)
        else:
            lengthscale = pairwise_difference_quantile(pre, lengthscale_quantile, n_pairs, generator)
        lengthscale = torch.maximum(lengthscale, floor)
        if amplitude_rule == "marginal_likelihood" and ml_amplitude is None:
            # the amplitude of largest likelihood at the quantile rule's own lengthscale
            _, ml_amplitude = marginal_likelihood_fit(
                pre, activation, lengthscale, noise=noise, generator=generator, grid=(1.0,))
    else:
        one = pre[torch.zeros(1, dtype=torch.long)][0]
        lengthscale, act_var = torch.ones_like(one), torch.zeros_like(one)
        ml_amplitude = torch.ones_like(one)  # nothing to fit: the unit rule's 1
    if amplitude_rule == "marginal_likelihood":
        amplitude = ml_amplitude
    elif amplitude_rule == "variance":
        amplitude = act_var.clamp_min(1e-6)
    elif amplitude_rule == "unit":
        amplitude = torch.ones_like(act_var)
    else:  # "max1"
        amplitude = act_var.clamp_min(1.0)
    return Hyperparameters(lengthscale=lengthscale, amplitude=amplitude, noise=float(noise))


def column_stats(pre, activation) -> ColumnStats:
    """Return the per-unit range and spread of ``pre`` (N >= 2 rows) and of its activation.

    The standard deviation of ``pre`` and the variance of ``activation(pre)`` come from float64
    sums over chunks (of a tensor, or the shards of a :class:`gapa.capture.store.StoredRows`),
    so no full-size temporary is made.
    """
    chunks = pre.split(STATS_CHUNK_ROWS) if isinstance(pre, torch.Tensor) else pre.chunks()
    n = len(pre)
    sums = torch.zeros(4, pre.shape[1], dtype=torch.float64, device=pre.device)
    lo = hi = None
    for chunk in chunks:
        lo = chunk.amin(0) if lo is None else torch.minimum(lo, chunk.amin(0))
        hi = chunk.amax(0) if hi is None else torch.maximum(hi, chunk.amax(0))
        act = activation(chunk.clone()).double()  # clone: an in-place activation must not write
        chunk = chunk.double()
        sums += torch.stack([chunk.sum(0), chunk.square().sum(0), act.sum(0), act.square().sum(0)])
    mean, act_mean = sums[0] / n, sums[2] / n
    var = ((sums[1] - n * mean.square()) / (n - 1)).clamp_min(0)
    act_var = ((sums[3] - n * act_mean.square()) / (n - 1)).clamp_min(0)
    return ColumnStats(lo=lo, hi=hi, std=var.sqrt().to(lo.dtype), act_var=act_var.to(lo.dtype))


# --- checks of user settings: refused, never repaired ----------------------------------------------


def check_positive(name: str, value) -> float:
    """Return ``value`` as a float.

    Raises
    ------
    ConfigurationError
        Naming ``name``, unless ``value`` is a finite real number > 0 (not a bool).
    """
    if not _is_real(value) or not (math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def check_quantile(q) -> None:
    """Refuse a ``lengthscale_quantile`` outside (0, 1].

    Raises
    ------
    ConfigurationError
        Unless ``q`` is a real number (not a bool) in (0, 1].
    """
    if not _is_real(q) or not 0.0 < q <= 1.0:
        raise ConfigurationError(f"lengthscale_quantile must lie in (0, 1], got {q!r}")


def check_overrides(overrides: Mapping[str, Mapping]) -> None:
    """Refuse a ``hyperparameters=`` mapping (layer or call site -> settings) that can't be right.

    The number of units is unknown before the fit, so a per-unit vector's length is checked
    later, by :func:`override`.

    Raises
    ------
    ConfigurationError
        For anything but a mapping of mappings, an unknown setting (see :data:`OVERRIDABLE`),
        a value that is not a number or a vector of numbers (``noise_ratio``: one number), or
        one that is not finite and positive.
    """
    if not isinstance(overrides, Mapping):
        raise ConfigurationError(
            f"hyperparameters must map layer names to settings, got {type(overrides).__name__}")
    for layer, values in overrides.items():
        _check_keys(values, layer)
        for name, value in values.items():
            _override_values(name, value, layer)


def _check_keys(values, layer) -> None:
    if not isinstance(values, Mapping):
        raise ConfigurationError(
            f"hyperparameters[{layer!r}] must map settings ({', '.join(OVERRIDABLE)}) to values, "
            f"got {type(values).__name__}")
    unknown = set(values) - set(OVERRIDABLE)
    if unknown:
        raise ConfigurationError(
            f"unknown hyperparameter(s) {sorted(map(str, unknown))}; allowed: "
            f"{', '.join(OVERRIDABLE)} (layer {layer!r})")


def _override_values(name: str, value, layer) -> torch.Tensor:
    """Return a user's override as a float64 tensor (0-d, or 1-d per unit), checked > 0."""
    where = f"(layer {layer!r})"
    try:  # through numpy: a Python float stays float64 (torch would make it float32)
        t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        raise ConfigurationError(
            f"{name} override {where} must be a number or a vector of numbers, got "
            f"{value!r}") from None
    if t.dtype == torch.bool or t.is_complex():
        raise ConfigurationError(f"{name} override {where} must be real numbers, got {t.dtype}")
    if t.dim() > (0 if name == "noise_ratio" else 1):
        what = "one number per layer" if name == "noise_ratio" else "a scalar or one value per unit"
        raise ConfigurationError(
            f"{name} override has shape {tuple(t.shape)} {where}; give {what}")
    t = t.to("cpu", torch.float64)
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        at = f" at unit {i}" if t.dim() else ""
        raise ConfigurationError(
            f"{name} override must be positive and finite {where}, got {t.reshape(-1)[i].item()}"
            f"{at}")
    return t


def override(hp: Hyperparameters, values: Mapping, layer: str = "?") -> Hyperparameters:
    """Replace fitted hyperparameters by user values (scalars or per-unit tensors).

    The values are checked as :func:`check_overrides` does, and each against the layer's width
    and dtype; they are copied, never kept.

    Parameters
    ----------
    hp : Hyperparameters
        The fitted values.
    values : Mapping
        Settings of :data:`OVERRIDABLE` to values.
    layer : str
        The layer or call site, for the messages.

    Returns
    -------
    Hyperparameters
        ``hp`` with the given settings replaced.

    Raises
    ------
    ConfigurationError
        For what :func:`check_overrides` refuses, a per-unit vector of the wrong length, or a
        value the layer's dtype cannot hold (overflow, or underflow to 0).
    """
    _check_keys(values, layer)
    changes: dict = {}
    for name, value in values.items():
        v = _override_values(name, value, layer)
        if name == "noise_ratio":  # the Hyperparameters field is ``noise``, relative too
            changes["noise"] = float(v)
            continue
        ref = getattr(hp, name)
        if v.dim() == 0:
            v = v.expand(ref.shape)
        if v.shape != ref.shape:
            raise ConfigurationError(
                f"{name} override has shape {tuple(v.shape)}; the layer has {ref.shape[0]} "
                f"units, so give a scalar or shape ({ref.shape[0]},) (layer {layer!r})")
        cast = v.to(ref.device, ref.dtype, copy=True).contiguous()  # never the user's tensor
        if not bool((torch.isfinite(cast) & (cast > 0)).all()):
            raise ConfigurationError(
                f"{name} override at layer {layer!r} (from {v.min().item():.3g} to "
                f"{v.max().item():.3g}) is not representable in the layer's {ref.dtype}: it "
                "overflows or underflows to 0")
        changes[name] = cast
    return replace(hp, **changes)
