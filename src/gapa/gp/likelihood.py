"""Kernel hyperparameters by the GP's own marginal likelihood (type-II maximum likelihood).

A unit's activation ``phi_j`` over its cached pre-activations is treated as one draw of the GP
prior ``k_j(u, u') = a_j (exp(-(u - u')^2 / (2 l_j^2)) + s [u = u'])``, with ``s`` the relative
noise of one cached row. For a lengthscale ``l`` the amplitude that maximises the likelihood of
the centred activations ``y`` (n rows) is closed-form, ``a*(l) = y^T (C_l + s I)^{-1} y / n``,
and the profile log likelihood is ``-n/2 log a*(l) - 1/2 log|C_l + s I|`` up to constants.
:func:`marginal_likelihood_fit` maximises it per unit over a grid of lengthscales, on a random
subsample of the cache; no labels, no gradients, one Cholesky factor per unit and grid point.

Why the activations and not the residuals: GAPA's posterior mean is the activation itself, so
its observed residuals are all zero, whose likelihood is largest at zero amplitude. The
activation's own shape (how fast it bends along the data) is what says how far a cached row's
information should reach.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .numerics import safe_cholesky

#: Cached rows the likelihood is computed on (one Gram matrix of this size per unit).
ML_ROWS = 128
#: Lengthscales tried, as multiples of the unit's pre-activation standard deviation: half
#: octaves from 2^-6 to 2^3.
ML_GRID = tuple(2.0 ** (e / 2) for e in range(-12, 7))
#: Elements of float64 Gram matrices formed at once (~256 MiB).
ML_CHUNK_ELEMENTS = 1 << 25
#: Smallest amplitude returned, so that a unit whose activation is constant stays usable.
MIN_AMPLITUDE = 1e-6


def profile_log_likelihood(
    u: torch.Tensor, y: torch.Tensor, lengthscale: torch.Tensor, noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(log likelihood, amplitude)`` per unit, the amplitude profiled out.

    Parameters
    ----------
    u : Tensor
        Pre-activations (n, d).
    y : Tensor
        Centred activations (n, d).
    lengthscale : Tensor
        (d,) per-unit lengthscale.
    noise : float
        Relative noise ``s`` on the diagonal.

    Returns
    -------
    tuple of Tensor
        The log likelihood (d,), including the constant ``-n/2 (log 2 pi + 1)``, and the
        maximising amplitude ``a*`` (d,), in float64.
    """
    n, d = u.shape
    u, y, lengthscale = u.double(), y.double(), lengthscale.double()
    ll, amp = torch.empty(d, dtype=torch.float64), torch.empty(d, dtype=torch.float64)
    step = max(1, ML_CHUNK_ELEMENTS // (n * n))
    eye = torch.eye(n, dtype=torch.float64, device=u.device)
    for s in range(0, d, step):
        ut = u[:, s : s + step].T  # (c, n)
        diff = (ut.unsqueeze(-1) - ut.unsqueeze(-2)) / lengthscale[s : s + step, None, None]
        chol = safe_cholesky(torch.exp(-0.5 * diff.square()) + noise * eye)
        w = torch.linalg.solve_triangular(chol, y[:, s : s + step].T.unsqueeze(-1), upper=False)
        quad = w.square().sum((-2, -1))
        a = (quad / n).clamp_min(torch.finfo(torch.float64).tiny)
        logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        ll[s : s + step] = (-0.5 * n * (torch.log(2 * torch.pi * a) + 1) - 0.5 * logdet).cpu()
        amp[s : s + step] = a.cpu()
    return ll, amp


def marginal_likelihood_fit(
    pre: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    std: torch.Tensor,
    *,
    noise: float,
    generator: torch.Generator,
    rows: int = ML_ROWS,
    grid: tuple[float, ...] = ML_GRID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-unit ``(lengthscale, amplitude)`` of largest marginal likelihood.

    Parameters
    ----------
    pre : Tensor or StoredRows
        The cached pre-activations (N x d), N >= 2.
    activation : callable
        The site's activation.
    std : Tensor
        (d,) standard deviation of each unit's pre-activation: the grid's unit.
    noise : float
        The relative noise of one cached row.
    generator : torch.Generator
        Draws the subsample of ``rows`` cached rows.
    rows, grid
        See :data:`ML_ROWS` and :data:`ML_GRID`.

    Returns
    -------
    tuple of Tensor
        Lengthscale and amplitude (d,), in ``pre``'s dtype and device. A unit whose
        pre-activation does not vary keeps the grid's scale on 1; a unit whose activation does
        not vary gets :data:`MIN_AMPLITUDE`.
    """
    pick = torch.randperm(len(pre), generator=generator)[:rows].sort().values
    u = pre[pick.to(pre.device)].double()
    y = activation(u.to(pre.dtype).clone()).double()
    y = y - y.mean(0)
    unit = std.double().clamp_min(torch.finfo(torch.float32).eps)
    best = torch.full((u.shape[1],), -torch.inf, dtype=torch.float64)
    lengthscale = torch.empty_like(best)
    amplitude = torch.empty_like(best)
    for factor in grid:  # a strictly better likelihood moves the choice: ties keep the shorter
        ll, a = profile_log_likelihood(u, y, factor * unit, noise)
        better = ll > best
        best = torch.where(better, ll, best)
        lengthscale = torch.where(better, factor * unit.cpu(), lengthscale)
        amplitude = torch.where(better, a, amplitude)
    out = dict(dtype=pre.dtype, device=pre.device)
    return lengthscale.to(**out), amplitude.clamp_min(MIN_AMPLITUDE).to(**out)
