"""GP posterior variance of each unit's activation, conditioned on cached rows.

The posterior mean is the original activation by construction (the cached residuals are zero),
so only variances are computed here. Three ways to condition, all on rows ``X`` (N x d) with
per-row relative noise ``r`` (N,) (``noise / count``):

* :func:`exact_variance`: the whole set, the reference (O(d N^3) once, O(d N^2) per query).
* :func:`local_variance`: the K rows nearest to each query, found jointly in activation space
  (O(d K^3) per query): the default.
* :func:`nearest_variance`: K = 1 in closed form, ``a - k(z, x)^2 / (a + s^2)``.
"""

from __future__ import annotations

import torch

from ..errors import CacheTooLargeError
from .kernels import Hyperparameters
from .numerics import clamp_variance, safe_cholesky

#: Largest set the exact reference conditions on (d x N x N Gram matrices are formed).
EXACT_MAX_ROWS = 4096

#: Elements per chunk of batched Gram matrices, bounding temporary memory (~128 MiB in float32).
CHUNK_ELEMENTS = 1 << 25

#: Dtypes whose Gram matrices are formed and factorised in float32: torch has no half-precision
#: Cholesky, and a K x K solve needs more bits than they hold. The variances come back in the
#: input's dtype.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype Gram matrices of ``dtype`` values are factorised in."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _correlation(u: torch.Tensor, v: torch.Tensor, lengthscale: torch.Tensor) -> torch.Tensor:
    """``exp(-(u - v)^2 / (2 l^2))``, broadcasting, with ``l`` over the last axis."""
    return torch.exp(-0.5 * ((u - v) / lengthscale).square())


def nearest_variance(
    z: torch.Tensor, x: torch.Tensor, r: torch.Tensor, hp: Hyperparameters
) -> torch.Tensor:
    """Return the posterior variance per unit given one neighbour per query.

    Parameters
    ----------
    z : Tensor
        Queries (B, d).
    x : Tensor
        Each query's cached row (B, d).
    r : Tensor
        Relative noise of those rows (B,).
    hp : Hyperparameters
        The site's kernel.

    Returns
    -------
    Tensor
        Variances (B, d), clamped into ``[VARIANCE_FLOOR * a, a]`` (:func:`clamp_variance`).
    """
    # In place on one fresh (B, d) buffer: at test-set sizes each extra temporary costs as much
    # as an elementwise pass of the network itself. Variances are not differentiated.
    with torch.no_grad():
        var = z - x
        var.div_(hp.lengthscale).square_().neg_().exp_()  # k(z, x)^2 / a^2
        var.div_(1.0 + r.unsqueeze(-1)).neg_().add_(1.0).mul_(hp.amplitude)
        return clamp_variance(var, hp.amplitude)


def local_variance(
    z: torch.Tensor, neighbours: torch.Tensor, r: torch.Tensor, hp: Hyperparameters
) -> torch.Tensor:
    """Return the posterior variance per unit given each query's own neighbours.

    Each unit is conditioned on its own K scalar values; K = 1 is :func:`nearest_variance`.

    Parameters
    ----------
    z : Tensor
        Queries (B, d).
    neighbours : Tensor
        Their K cached rows (B, K, d).
    r : Tensor
        Relative noise of those rows (B, K).
    hp : Hyperparameters
        The site's kernel.

    Returns
    -------
    Tensor
        Variances (B, d), clamped into ``[VARIANCE_FLOOR * a, a]``.

    Raises
    ------
    NumericalError
        A K x K Gram matrix cannot be factorised even with the largest jitter.
    """
    b, k, d = neighbours.shape
    if k == 1:
        return nearest_variance(z, neighbours[:, 0], r[:, 0], hp)
    dtype = _solve_dtype(z.dtype)
    if dtype != z.dtype:
        return local_variance(z.to(dtype), neighbours.to(dtype), r.to(dtype),
                              hp.to(dtype=dtype)).to(z.dtype)
    out = torch.empty_like(z)
    step = max(1, CHUNK_ELEMENTS // (d * k * k))
    eye = torch.eye(k, dtype=z.dtype, device=z.device)
    for s in range(0, b, step):
        xn = neighbours[s : s + step].transpose(1, 2)  # (b, d, K)
        gram = _correlation(xn.unsqueeze(-1), xn.unsqueeze(-2), hp.lengthscale[:, None, None])
        gram = gram + r[s : s + step, None, :, None] * eye  # relative noise on the diagonal
        cross = _correlation(z[s : s + step].unsqueeze(-1), xn, hp.lengthscale[:, None])
        chol = safe_cholesky(gram)
        w = torch.linalg.solve_triangular(chol, cross.unsqueeze(-1), upper=False)
        out[s : s + step] = hp.amplitude * (1.0 - w.squeeze(-1).square().sum(-1))
    return clamp_variance(out, hp.amplitude)


class ExactConditioner:
    """Exact GP conditioning of every unit on all rows: the slow reference.

    Factorises the d Gram matrices once; each query then costs O(d N^2).

    Parameters
    ----------
    x : Tensor
        The conditioning rows (N x d).
    r : Tensor
        Their relative noise (N,).
    hp : Hyperparameters
        The site's kernel.

    Raises
    ------
    CacheTooLargeError
        More than :data:`EXACT_MAX_ROWS` rows.
    NumericalError
        A Gram matrix cannot be factorised even with the largest jitter.
    """

    def __init__(self, x: torch.Tensor, r: torch.Tensor, hp: Hyperparameters):
        n, d = x.shape
        if n > EXACT_MAX_ROWS:
            raise CacheTooLargeError(
                f"exact conditioning on {n} rows would factorise {d} Gram matrices of "
                f"{n} x {n}; the limit is {EXACT_MAX_ROWS} rows. Use conditioning='local' "
                f"(K nearest neighbours) or m=<number of inducing points>."
            )
        dtype = _solve_dtype(x.dtype)
        x, r, hp = x.to(dtype), r.to(dtype), hp.to(dtype=dtype)
        self.x, self.hp = x, hp
        xt = x.T  # (d, N)
        gram = _correlation(xt.unsqueeze(-1), xt.unsqueeze(-2), hp.lengthscale[:, None, None])
        gram = gram + torch.diag_embed(r.expand(d, n))
        self.chol = safe_cholesky(gram)  # (d, N, N)

    def variance(self, z: torch.Tensor) -> torch.Tensor:
        """Return the posterior variance (B, d) per unit at the queries ``z`` (B, d).

        In ``z``'s dtype (computed in float32 for :data:`LOW_PRECISION` dtypes).
        """
        if z.dtype != self.x.dtype:
            return self.variance(z.to(self.x.dtype)).to(z.dtype)
        b, d = z.shape
        out = torch.empty_like(z)
        n = self.x.shape[0]
        step = max(1, CHUNK_ELEMENTS // (d * n))
        for s in range(0, b, step):
            cross = _correlation(
                z[s : s + step].T.unsqueeze(-1), self.x.T.unsqueeze(1), self.hp.lengthscale[:, None, None]
            )  # (d, b, N)
            w = torch.linalg.solve_triangular(self.chol, cross.transpose(1, 2), upper=False)
            out[s : s + step] = self.hp.amplitude * (1.0 - w.square().sum(1).T)
        return clamp_variance(out, self.hp.amplitude)
