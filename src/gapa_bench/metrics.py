"""Regression metrics for Gaussian predictives (NLL, CRPS, CQM, coverage, RMSE) and
classification and OOD metrics (accuracy, NLL, ECE, Brier; AUROC, FPR at 95% TPR).

The regression functions take tensors of one identical shape (no broadcasting); all compute in
float64 and average over all elements. Bad inputs raise; nothing is silently repaired.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from gapa.errors import InputError, NonFiniteError

#: Default grid of central-interval probabilities for :func:`cqm` and :func:`coverage`.
DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

_LOG_2PI = math.log(2.0 * math.pi)
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)

__all__ = [
    "DEFAULT_ALPHAS",
    "ECE_BINS",
    "classification_report",
    "coverage",
    "cqm",
    "crps_gaussian",
    "gaussian_nll",
    "ood_report",
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


# --------------------------------------------------------------------------- classification

#: Equal-width confidence bins of the expected calibration error (method.md, section 6).
ECE_BINS = 15


def _check_probs(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(probs, torch.Tensor) or probs.ndim != 2 or not probs.is_floating_point():
        raise InputError(f"probs must be a floating (N, C) tensor, got "
                         f"{getattr(probs, 'shape', type(probs).__name__)}")
    if (not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64
            or labels.shape != probs.shape[:1]):
        raise InputError(f"labels must be int64 of shape ({probs.shape[0]},), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    (p,) = _check(probs=probs)
    if bool((p < 0).any()) or not torch.allclose(p.sum(-1), torch.ones_like(p[:, 0]), atol=1e-4):
        raise InputError("probs must be non-negative with rows summing to 1")
    if bool(((labels < 0) | (labels >= p.shape[1])).any()):
        raise InputError(f"labels must lie in [0, {p.shape[1]})")
    return p, labels.to(p.device)


def classification_report(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL (nats, mean), ECE (15 equal-width bins, L1) and Brier score (summed over
    classes, mean over inputs) of predicted class probabilities ``(N, C)``."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    p, y = _check_probs(probs, labels)
    picked = p.gather(1, y[:, None]).squeeze(1)
    one_hot = torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    ece = multiclass_calibration_error(p, y, num_classes=p.shape[1], n_bins=ECE_BINS, norm="l1")
    return {
        "accuracy": float((p.argmax(1) == y).to(torch.float64).mean()),
        "nll": float(-torch.log(picked.clamp_min(torch.finfo(p.dtype).tiny)).mean()),
        "ece": float(ece),
        "brier": float((p - one_hot).square().sum(1).mean()),
    }


def unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Map scores monotonically onto [0, 1] (float64), keeping every order and tie.

    torchmetrics reads binary scores outside [0, 1] as logits and applies a sigmoid, which in
    float32 ties every score above about 17 at 1.0: distances and summed variances then score an
    AUROC of 0.5 whatever they separate.
    """
    s = scores.double()
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if bool(hi > lo) else torch.zeros_like(s)


def ood_report(score_in: torch.Tensor, score_out: torch.Tensor) -> dict[str, float]:
    """AUROC and FPR at 95% TPR of an OOD score (higher = more OOD), with out-of-distribution
    inputs as the positives (method.md): ``fpr95`` is the fraction of in-distribution inputs
    flagged when the threshold catches 95% of the OOD ones."""
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    (s_in,) = _check(score_in=score_in)
    (s_out,) = _check(score_out=score_out)
    if s_in.ndim != 1 or s_out.ndim != 1:
        raise InputError(f"OOD scores must be 1-D, got {tuple(s_in.shape)} and {tuple(s_out.shape)}")
    scores = unit_interval(torch.cat([s_in, s_out]))
    target = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)]).long()
    fpr, tpr, _ = binary_roc(scores, target)
    return {
        "auroc": float(binary_auroc(scores, target)),
        "fpr95": float(fpr[tpr >= 0.95].min()),
    }
