"""Regression metrics for Gaussian predictives: NLL, CRPS, CQM, coverage and RMSE.

Every function takes tensors of one identical shape (no broadcasting), computes in float64 and
averages over all elements. Bad inputs raise; nothing is silently repaired.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from .errors import InputError, NonFiniteError

#: Default grid of central-interval probabilities for :func:`cqm` and :func:`coverage`.
DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

_LOG_2PI = math.log(2.0 * math.pi)
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)

__all__ = [
    "DEFAULT_ALPHAS",
    "coverage",
    "cqm",
    "crps_gaussian",
    "gaussian_nll",
    "regression_report",
    "rmse",
]


def _check(**tensors: torch.Tensor) -> list[torch.Tensor]:
    """Validate same-shape, same-device, non-empty, finite tensors; return them as float64."""
    items = list(tensors.items())
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"{name} must be a real floating or integer tensor, got {t.dtype}")
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            shapes = ", ".join(f"{n}{tuple(x.shape)}" for n, x in items)
            raise InputError(f"shape mismatch (broadcasting is not allowed): {shapes}")
        if t.device != first.device:
            raise InputError(
                f"device mismatch: {first_name} on {first.device}, {name} on {t.device}"
            )
    if first.numel() == 0:
        raise InputError(f"empty inputs: {first_name} has shape {tuple(first.shape)}")
    out = []
    for name, t in items:
        t64 = t.detach().to(torch.float64)
        bad = ~torch.isfinite(t64)
        if bool(bad.any()):
            raise NonFiniteError(f"{name} has {int(bad.sum())} non-finite (NaN/Inf) entries")
        out.append(t64)
    return out


def _check_std(std: torch.Tensor) -> None:
    bad = std <= 0
    if bool(bad.any()):
        raise InputError(
            f"std must be strictly positive; {int(bad.sum())} entries are <= 0 "
            f"(min {float(std.min()):.3g})"
        )


def _check_alphas(alphas: Sequence[float], *, open_interval: bool) -> list[float]:
    vals = [float(a) for a in alphas]
    if not vals:
        raise InputError("alphas must not be empty")
    for a in vals:
        ok = 0.0 < a < 1.0 if open_interval else 0.0 <= a <= 1.0
        if not ok:
            where = "(0, 1)" if open_interval else "[0, 1]"
            raise InputError(f"every alpha must lie in {where}, got {a}")
    return vals


def gaussian_nll(mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log density of ``y`` under ``N(mean, std**2)``."""
    mean, std, y = _check(mean=mean, std=std, y=y)
    _check_std(std)
    z = (y - mean) / std
    nll = 0.5 * _LOG_2PI + torch.log(std) + 0.5 * z.square()
    return float(nll.mean())


def crps_gaussian(mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor) -> float:
    """Mean continuous ranked probability score of ``N(mean, std**2)`` at ``y`` (closed form)."""
    mean, std, y = _check(mean=mean, std=std, y=y)
    _check_std(std)
    z = (y - mean) / std
    cdf = torch.special.ndtr(z)
    pdf = torch.exp(-0.5 * z.square() - 0.5 * _LOG_2PI)
    crps = std * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - _INV_SQRT_PI)
    return float(crps.mean())


def _coverage(mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor, alphas: list[float]):
    abs_z = (y - mean).abs() / std
    out = []
    for a in alphas:
        q = float(torch.special.ndtri(torch.tensor(0.5 + 0.5 * a, dtype=torch.float64)))
        out.append(float((abs_z <= q).to(torch.float64).mean()))
    return out


def coverage(
    mean: torch.Tensor,
    std: torch.Tensor,
    y: torch.Tensor,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> list[float]:
    """Fraction of ``y`` inside the central ``alpha`` interval ``mean ± Φ⁻¹(½+α/2)·std``, per alpha.

    Alphas may lie anywhere in ``[0, 1]``; the result follows their order.
    """
    mean, std, y = _check(mean=mean, std=std, y=y)
    _check_std(std)
    return _coverage(mean, std, y, _check_alphas(alphas, open_interval=False))


def cqm(
    mean: torch.Tensor,
    std: torch.Tensor,
    y: torch.Tensor,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> float:
    """Calibration quality metric: trapezoid integral over ``[0, 1]`` of ``|coverage(α) - α|``.

    The end points ``α = 0`` and ``α = 1`` count as 0, so for the default grid this is
    ``0.1 * sum |c(α) - α|``. ``alphas`` must be strictly increasing inside ``(0, 1)``.
    """
    mean, std, y = _check(mean=mean, std=std, y=y)
    _check_std(std)
    vals = _check_alphas(alphas, open_interval=True)
    if any(b <= a for a, b in itertools.pairwise(vals)):
        raise InputError(f"alphas must be strictly increasing, got {vals}")
    gaps = [abs(c - a) for c, a in zip(_coverage(mean, std, y, vals), vals, strict=True)]
    xs = [0.0, *vals, 1.0]
    fs = [0.0, *gaps, 0.0]
    return float(sum(0.5 * (xs[i + 1] - xs[i]) * (fs[i + 1] + fs[i]) for i in range(len(xs) - 1)))


def rmse(mean: torch.Tensor, y: torch.Tensor) -> float:
    """Root mean squared error of ``mean`` against ``y``."""
    mean, y = _check(mean=mean, y=y)
    return float((y - mean).square().mean().sqrt())


def regression_report(mean: torch.Tensor, std: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """All four metrics at once: keys ``"nll"``, ``"crps"``, ``"cqm"``, ``"rmse"``."""
    return {
        "nll": gaussian_nll(mean, std, y),
        "crps": crps_gaussian(mean, std, y),
        "cqm": cqm(mean, std, y),
        "rmse": rmse(mean, y),
    }
