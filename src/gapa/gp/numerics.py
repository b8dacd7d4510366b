"""Numerical safety in one place: Cholesky with bounded jitter, and the variance floor."""

from __future__ import annotations

import warnings

import torch

from ..errors import NumericalError

#: Smallest variance GAPA reports, relative to the kernel amplitude. Posterior variances can come
#: out slightly negative from cancellation; they are clamped here (never silently NaN-repaired).
VARIANCE_FLOOR = 1e-10

#: Jitter schedule for :func:`safe_cholesky`, relative to the mean diagonal of the matrix.
JITTER_START = {torch.float32: 1e-6, torch.float64: 1e-10}
JITTER_MAX = 1e-2


class JitterWarning(UserWarning):
    """A Cholesky factorisation needed added jitter."""


def safe_cholesky(a: torch.Tensor) -> torch.Tensor:
    """Return the lower Cholesky factor of a batch of symmetric PSD matrices.

    Entries that fail get jitter ``eps * mean(diag)`` added, with ``eps`` growing tenfold from
    :data:`JITTER_START` up to :data:`JITTER_MAX`, a warning at each step; only failing entries are
    touched.

    Parameters
    ----------
    a : Tensor
        Matrices (..., n, n).

    Returns
    -------
    Tensor
        Their lower Cholesky factors, same shape.

    Warns
    -----
    JitterWarning
        At each jitter step.

    Raises
    ------
    NumericalError
        Naming the final jitter, when that is not enough.
    """
    chol, info = torch.linalg.cholesky_ex(a)
    if not bool((info > 0).any()):
        return chol
    scale = a.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).abs().clamp_min(1e-30)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    eps = JITTER_START.get(a.dtype, 1e-6)
    while eps <= JITTER_MAX:
        bad = info > 0
        n_bad = int(bad.sum())
        warnings.warn(
            f"Cholesky failed for {n_bad} of {info.numel()} matrices of size {a.shape[-1]}; "
            f"retrying with jitter {eps:.1e} x mean diagonal",
            JitterWarning,
            stacklevel=2,
        )
        jittered = a[bad] + (eps * scale[bad]).unsqueeze(-1) * eye
        fixed, fixed_info = torch.linalg.cholesky_ex(jittered)
        chol = chol.clone()
        chol[bad] = fixed
        info = info.clone()
        info[bad] = fixed_info
        if not bool((info > 0).any()):
            return chol
        eps *= 10.0
    raise NumericalError(
        f"Cholesky failed for {int((info > 0).sum())} matrices of size {a.shape[-1]} even with "
        f"jitter {JITTER_MAX:.0e} x mean diagonal; the cached activations may be degenerate "
        "(raise the kernel noise)."
    )


def clamp_variance(var: torch.Tensor, amplitude: torch.Tensor | float) -> torch.Tensor:
    """Clamp posterior variances into ``[VARIANCE_FLOOR * amplitude, amplitude]``."""
    floor = VARIANCE_FLOOR * amplitude
    return var.clamp(min=floor, max=amplitude)
