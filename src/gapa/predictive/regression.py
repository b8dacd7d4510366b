"""Post-hoc regression calibration of the predictive ``N(mean, scale*var + noise)``.

``scale`` and ``noise`` are fitted so that the predictive has the smallest validation Gaussian
NLL. The mean is never changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from ..errors import InputError, NonFiniteError

__all__ = ["Calibration", "fit_scale_and_noise"]

_LOG_2PI = math.log(2.0 * math.pi)
#: Points of the coarse log-space grid scanned before each bounded Brent refinement.
_GRID = 17
#: Brent tolerance in log space (about 1e-7 relative).
_XATOL = 1e-7
#: Step (in log space) of the scan of a 1-D NLL profile; the nested reference scanned ~1.7.
_SCAN_STEP = 0.5
#: How many scanned local minima of a profile are refined.
_REFINE = 4
#: brentq tolerances in log space for the root of a profile's derivative.
_XTOL, _RTOL = 1e-12, 4 * np.finfo(float).eps


@dataclass(frozen=True)
class Calibration:
    """Fitted predictive ``N(mean, scale*var + noise)``; ``nll`` is the mean validation NLL."""

    scale: float
    """Multiplies GAPA's variance (0 when the noise-only fit is best)."""
    noise: float
    """The output noise variance added."""
    nll: float
    """Mean validation Gaussian NLL of the fitted predictive."""

    def predictive_var(self, var: torch.Tensor) -> torch.Tensor:
        """Return the predictive variance ``scale*var + noise``, in ``var``'s dtype and device.

        Parameters
        ----------
        var : torch.Tensor
            GAPA's epistemic variance.

        Returns
        -------
        torch.Tensor
            ``scale*var + noise``.

        Raises
        ------
        InputError
            When ``var`` is not a tensor or has negative entries.
        NonFiniteError
            When ``var`` has NaN or Inf entries.
        """
        if not isinstance(var, torch.Tensor):
            raise InputError(f"var must be a torch.Tensor, got {type(var).__name__}")
        if not bool(torch.isfinite(var).all()):
            raise NonFiniteError("var has non-finite (NaN/Inf) entries")
        if bool((var < 0).any()):
            raise InputError(f"var must be non-negative (min {float(var.min()):.3g})")
        return self.scale * var + self.noise

    def predictive_std(self, var: torch.Tensor) -> torch.Tensor:
        """Return the predictive standard deviation ``sqrt(scale*var + noise)``.

        In ``var``'s dtype and device.

        Parameters
        ----------
        var : torch.Tensor
            GAPA's epistemic variance.

        Returns
        -------
        torch.Tensor
            ``sqrt(scale*var + noise)``.

        Raises
        ------
        InputError
            When ``var`` is not a tensor or has negative entries.
        NonFiniteError
            When ``var`` has NaN or Inf entries.
        """
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
    """Minimise ``f`` over ``[lo, hi]`` (both > 0) in log space.

    A log-space grid of ``points``, then bounded Brent between the best point's neighbours.

    Parameters
    ----------
    f : callable
        A function of one positive float.
    lo, hi : float
        The interval, ``0 < lo < hi``.
    points : int, default 17
        Points of the grid.
    xatol : float, default 1e-7
        Brent's tolerance, in log space.

    Returns
    -------
    tuple of float
        ``(x, f(x))`` at the best point found.
    """
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


def _noise_bounds(r2: np.ndarray, mse: float) -> tuple[float, float]:
    """Return the search interval for the noise.

    The NLL increases in noise beyond max(r2), so the optimum lies below the top; the bottom
    stays > 0 on purpose, so predictive_std is positive even where a test var is 0.
    """
    return 1e-6 * mse, max(10.0 * mse, float(r2.max()))


def _argmin_1d(
    f: Callable[[float, bool], tuple[float, float, tuple[float, ...]]], a: float, b: float
) -> tuple[float, tuple[float, ...]]:
    """Return the global minimum over ``[a, b]`` of a C1 profile, and its point.

    The profile is ``f(u, with_value) -> (derivative, value, point)``. The value (``nan`` unless
    asked for) costs a log per row, the bulk of the time, so it is computed only at the
    candidates.

    The NLL profiles are not convex in general (e.g. groups of rows in different variance regimes
    give several basins), so the derivative is first scanned on a grid of step ``_SCAN_STEP``.
    Candidates are both ends and a root of ``f'`` (brentq) in each grid interval where ``f'`` goes
    from - to +; if there are more than ``_REFINE`` such intervals, only the lowest, by the
    value integrated from ``f'`` (trapezoid rule), are refined. Returns the best value and its
    ``point``.
    """
    grid = np.linspace(a, b, max(math.ceil((b - a) / _SCAN_STEP), 2) + 1)
    ders = np.array([f(u, False)[0] for u in grid])
    brackets = np.flatnonzero((ders[:-1] < 0.0) & (ders[1:] >= 0.0))
    if brackets.size > _REFINE:
        rise = np.cumsum(0.5 * np.diff(grid) * (ders[:-1] + ders[1:]))
        brackets = brackets[np.argsort(rise[brackets], kind="stable")[:_REFINE]]
    roots = [
        brentq(lambda u: f(u, False)[0], grid[j], grid[j + 1], xtol=_XTOL, rtol=_RTOL)
        for j in brackets
    ]
    _, val, point = min((f(u, True) for u in (a, b, *roots)), key=lambda r: r[1])
    return val, point


def _fit_noise(r2: np.ndarray, v: np.ndarray, mse: float) -> tuple[float, float]:
    """Return the best noise for the fixed scale 1 (``t = v + noise``) as ``(noise, nll)``."""
    n_lo, n_hi = _noise_bounds(r2, mse)
    q, rq = np.empty_like(v), np.empty_like(v)

    def profile(u: float, with_value: bool) -> tuple[float, float, tuple[float]]:
        noise = min(max(math.exp(u), n_lo), n_hi)
        np.divide(1.0, np.add(v, noise, out=q), out=q)
        np.multiply(r2, q, out=rq)
        der = 0.5 * noise * (float(q.sum()) - float(rq @ q)) / v.size
        val = math.nan
        if with_value:
            val = 0.5 * (_LOG_2PI + float(rq.sum() - np.log(q, out=q).sum()) / v.size)
        return der, val, (noise,)

    _, (noise,) = _argmin_1d(profile, math.log(n_lo), math.log(n_hi))
    return noise, _nll(r2, v + noise)


def _fit_both(r2: np.ndarray, v: np.ndarray, mse: float) -> tuple[float, float, float]:
    """Return the best ``(scale, noise, nll)`` over the box of the nested reference search.

    The search is exactly reduced to one dimension. With ``rho = scale/noise``,
    ``t_i = noise*(1 + rho*v_i)`` and the NLL is
    ``0.5*(log 2pi + log noise + mean log(1 + rho*v) + A/noise)`` with ``A = mean(r2/(1 + rho*v))``:
    unimodal in noise, so for a fixed ``rho`` the best noise in the box is ``A`` clipped to the
    box's slice at that ``rho``. Only the profile over ``log rho`` needs a (global) search.
    """
    s0 = mse / float(v.mean())
    s_lo, s_hi = 1e-6 * s0, 1e6 * s0
    n_lo, n_hi = _noise_bounds(r2, mse)
    xw, w, r2w = np.empty_like(v), np.empty_like(v), np.empty_like(v)

    def profile(u: float, with_value: bool) -> tuple[float, float, tuple[float, float]]:
        rho = math.exp(u)
        np.multiply(v, rho, out=xw)
        np.divide(1.0, np.add(xw, 1.0, out=w), out=w)
        np.multiply(xw, w, out=xw)
        np.multiply(r2, w, out=r2w)
        a = float(r2w.sum()) / v.size
        lo, hi = max(n_lo, s_lo / rho), min(n_hi, s_hi / rho)
        noise = max(min(a, hi), lo)
        der = float(xw.sum()) / v.size - float(r2w @ xw) / (v.size * noise)
        # d log(noise)/du is -1 where the clip is a scale bound (noise = bound/rho), else 0.
        if (a < lo and s_lo / rho > n_lo) or (a > hi and s_hi / rho < n_hi):
            der -= 1.0 - a / noise
        val = math.nan
        if with_value:
            mean_log = float(np.log(w, out=w).sum()) / v.size
            val = 0.5 * (_LOG_2PI + math.log(noise) - mean_log + a / noise)
        return 0.5 * der, val, (rho * noise, noise)

    _, (scale, noise) = _argmin_1d(profile, math.log(s_lo / n_hi), math.log(s_hi / n_lo))
    return scale, noise, _nll(r2, scale * v + noise)


def _fit_noise_nested(r2: np.ndarray, v: np.ndarray, mse: float) -> tuple[float, float]:
    """Fit the noise by a log grid then bounded Brent (the reference for :func:`_fit_noise`)."""
    return argmin_log(lambda n: _nll(r2, v + n), *_noise_bounds(r2, mse))


def _fit_both_nested(r2: np.ndarray, v: np.ndarray, mse: float) -> tuple[float, float, float]:
    """Fit scale and noise by nested 1-D searches (the reference for :func:`_fit_both`).

    A bounded search over scale, each step with an inner one over noise (about a thousand NLL
    evaluations over all rows).
    """
    s0 = mse / float(v.mean())
    cache: dict[float, tuple[float, float]] = {}

    def profile(s: float) -> float:
        if s not in cache:
            cache[s] = _fit_noise_nested(r2, s * v, mse)
        return cache[s][1]

    scale, nll = argmin_log(profile, 1e-6 * s0, 1e6 * s0)
    noise = cache[scale][0] if scale in cache else _fit_noise_nested(r2, scale * v, mse)[0]
    return scale, noise, nll


def _fit(
    mean: torch.Tensor,
    var: torch.Tensor,
    y: torch.Tensor,
    fit_scale: bool,
    fit_noise: Callable[[np.ndarray, np.ndarray, float], tuple[float, float]],
    fit_both: Callable[[np.ndarray, np.ndarray, float], tuple[float, float, float]],
) -> Calibration:
    """Check the inputs and fit, with the special cases shared by the fast fit and its reference."""
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
        noise, nll = fit_noise(r2, v, mse)
        return Calibration(scale=scale, noise=noise, nll=nll)

    scale, noise, nll = fit_both(r2, v, mse)
    # The noise-only fit (scale = 0) is always a candidate, so we never do worse than it.
    nll_noise_only = _nll(r2, np.full_like(r2, mse))
    if nll_noise_only < nll:
        return Calibration(scale=0.0, noise=mse, nll=nll_noise_only)
    return Calibration(scale=scale, noise=noise, nll=nll)


def fit_scale_and_noise(
    mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor, *, fit_scale: bool = True
) -> Calibration:
    """Fit ``scale`` and ``noise`` of ``N(mean, scale*var + noise)`` by minimising validation NLL.

    For each ratio ``scale/noise`` the best noise has a closed form, so only a 1-D profile over
    that ratio is searched: a fine log grid, then a root of its derivative. If every ``var`` is
    zero, ``noise = mean((y - mean)**2)`` exactly and ``scale = 0`` (1 with
    ``fit_scale=False``). With ``fit_scale=False`` the scale stays 1 and only the noise is
    fitted. Otherwise the scale lies in ``[1e-6, 1e6] * mse/mean(var)``, the noise is kept at
    least ``1e-6 * mean((y - mean)**2)`` (so predictive std is always positive), and the
    noise-only fit (``scale = 0``) is returned when it is better. One scalar scale and noise are
    shared by all elements (all outputs).

    Parameters
    ----------
    mean : torch.Tensor
        The predicted means on the validation data.
    var : torch.Tensor
        GAPA's variances there, of ``mean``'s shape, non-negative.
    y : torch.Tensor
        The validation targets, of ``mean``'s shape (no broadcasting).
    fit_scale : bool, default True
        Fit the scale; False keeps it at 1 and fits only the noise.

    Returns
    -------
    Calibration
        The fitted scale, noise and mean validation NLL.

    Raises
    ------
    InputError
        When an input is not a real tensor, the shapes differ, the inputs are empty, ``var``
        has negative entries, or every residual ``y - mean`` is zero (the noise is not
        identifiable).
    NonFiniteError
        NaN or Inf in an input.
    """
    return _fit(mean, var, y, fit_scale, _fit_noise, _fit_both)


def _fit_scale_and_noise_reference(
    mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor, *, fit_scale: bool = True
) -> Calibration:
    """Fit as :func:`fit_scale_and_noise` does, by the former nested 1-D searches (~20x slower).

    Kept so tests can check the fast fit.
    """
    return _fit(mean, var, y, fit_scale, _fit_noise_nested, _fit_both_nested)
