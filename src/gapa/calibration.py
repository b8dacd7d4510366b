"""Post-hoc calibration: fit ``scale`` and ``noise`` so that ``N(mean, scale*var + noise)`` has the
smallest validation Gaussian NLL. The mean is never changed."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from .errors import InputError, NonFiniteError

__all__ = ["Calibration", "fit_scale_and_noise"]

_LOG_2PI = math.log(2.0 * math.pi)
#: Points of the coarse log-space grid scanned before each bounded Brent refinement.
_GRID = 17
#: Brent tolerance in log space (about 1e-7 relative).
_XATOL = 1e-7


@dataclass(frozen=True)
class Calibration:
    """Fitted predictive ``N(mean, scale*var + noise)``; ``nll`` is the mean validation NLL."""

    scale: float
    noise: float
    nll: float

    def predictive_var(self, var: torch.Tensor) -> torch.Tensor:
        """``scale*var + noise``, in ``var``'s dtype and device."""
        if not isinstance(var, torch.Tensor):
            raise InputError(f"var must be a torch.Tensor, got {type(var).__name__}")
        if not bool(torch.isfinite(var).all()):
            raise NonFiniteError("var has non-finite (NaN/Inf) entries")
        if bool((var < 0).any()):
            raise InputError(f"var must be non-negative (min {float(var.min()):.3g})")
        return self.scale * var + self.noise

    def predictive_std(self, var: torch.Tensor) -> torch.Tensor:
        """``sqrt(scale*var + noise)``, in ``var``'s dtype and device."""
        return self.predictive_var(var).sqrt()


def _as_numpy(name: str, t: torch.Tensor) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{name} must be a real floating or integer tensor, got {t.dtype}")
    arr = t.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
    bad = ~np.isfinite(arr)
    if bad.any():
        raise NonFiniteError(f"{name} has {int(bad.sum())} non-finite (NaN/Inf) entries")
    return arr


def _nll(r2: np.ndarray, total_var: np.ndarray) -> float:
    return float(0.5 * np.mean(_LOG_2PI + np.log(total_var) + r2 / total_var))


def argmin_log(
    f: Callable[[float], float], lo: float, hi: float, *, points: int = _GRID,
    xatol: float = _XATOL,
) -> tuple[float, float]:
    """Minimise ``f`` over ``[lo, hi]`` (both > 0): a log-space grid of ``points``, then
    bounded Brent between the best point's neighbours (``xatol`` in log space)."""
    grid = np.linspace(math.log(lo), math.log(hi), points)
    vals = [f(math.exp(t)) for t in grid]
    i = int(np.argmin(vals))
    best_x, best_f = math.exp(grid[i]), vals[i]
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, points - 1)]
    res = minimize_scalar(
        lambda t: f(math.exp(t)), bounds=(a, b), method="bounded", options={"xatol": xatol}
    )
    if float(res.fun) < best_f:
        best_x, best_f = math.exp(float(res.x)), float(res.fun)
    return best_x, best_f


def _fit_noise(r2: np.ndarray, sv: np.ndarray, mse: float) -> tuple[float, float]:
    """Best noise for a fixed ``scale*var`` (``sv``); returns ``(noise, nll)``."""
    # The NLL increases in noise beyond max(r2), so the optimum lies below that.
    lo, hi = 1e-6 * mse, max(10.0 * mse, float(r2.max()))
    # noise stays >= lo > 0 on purpose, so predictive_std is positive even where a test var is 0.
    return argmin_log(lambda n: _nll(r2, sv + n), lo, hi)


def fit_scale_and_noise(
    mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor, *, fit_scale: bool = True
) -> Calibration:
    """Fit ``scale`` and ``noise`` of ``N(mean, scale*var + noise)`` by minimising validation NLL.

    Nested bounded 1-D searches in log space: the outer over ``scale``, the inner over ``noise``.
    If every ``var`` is zero, ``scale = 0`` and ``noise = mean((y - mean)**2)`` exactly. With
    ``fit_scale=False`` the scale stays 1 and only the noise is fitted. Otherwise the noise is kept
    at least ``1e-6 * mean((y - mean)**2)`` (so predictive std is always positive), and the
    noise-only fit (``scale = 0``) is returned when it is better. One scalar scale and noise are
    shared by all elements (all outputs).
    """
    shapes = {"mean": mean, "var": var, "y": y}
    for name, t in shapes.items():
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (mean.shape == var.shape == y.shape):
        raise InputError(
            "shape mismatch (broadcasting is not allowed): "
            f"mean{tuple(mean.shape)}, var{tuple(var.shape)}, y{tuple(y.shape)}"
        )
    if mean.numel() == 0:
        raise InputError(f"empty inputs: mean has shape {tuple(mean.shape)}")
    m, v, t = (_as_numpy(name, x) for name, x in shapes.items())
    if (v < 0).any():
        raise InputError(
            f"var must be non-negative; {int((v < 0).sum())} entries are < 0 (min {v.min():.3g})"
        )
    r2 = (t - m) ** 2
    mse = float(r2.mean())
    if not mse > 0.0:
        raise InputError(
            "all residuals y - mean are zero; the noise is not identifiable (NLL has no minimum)"
        )

    all_zero = not (v > 0).any()
    if all_zero or not fit_scale:
        scale = 1.0 if not fit_scale else 0.0
        if all_zero:
            return Calibration(scale=scale, noise=mse, nll=_nll(r2, np.full_like(r2, mse)))
        noise, nll = _fit_noise(r2, v, mse)
        return Calibration(scale=scale, noise=noise, nll=nll)

    s0 = mse / float(v.mean())
    cache: dict[float, tuple[float, float]] = {}

    def profile(s: float) -> float:
        if s not in cache:
            cache[s] = _fit_noise(r2, s * v, mse)
        return cache[s][1]

    scale, nll = argmin_log(profile, 1e-6 * s0, 1e6 * s0)
    noise = cache[scale][0] if scale in cache else _fit_noise(r2, scale * v, mse)[0]
    # The noise-only fit (scale = 0) is always a candidate, so we never do worse than it.
    nll_noise_only = _nll(r2, np.full_like(r2, mse))
    if nll_noise_only < nll:
        return Calibration(scale=0.0, noise=mse, nll=nll_noise_only)
    return Calibration(scale=scale, noise=noise, nll=nll)
