"""ELLA: the linearised Laplace approximation with a Nyström approximation of the NTK.

Deng, Zhou & Zhu, "Accelerated Linearized Laplace Approximation for Bayesian Deep Learning",
NeurIPS 2022. The linearised network ``f(x, θ*) + J(x)(θ - θ*)`` with prior ``θ ~ N(θ*, δ⁻¹ I)``
is a GP with kernel ``J(x) J(x')ᵀ / δ`` (the NTK). ELLA takes ``M`` random training inputs,
the top ``K`` eigenpairs ``(λ_k, u_k)`` of their Gram matrix ``K_MM = J_M J_Mᵀ`` and the Nyström
features ``ψ_k(x) = λ_k^{-1/2} Σ_m u_km k(x, x_m) = J(x) v_k`` with ``v_k = λ_k^{-1/2} J_Mᵀ u_k``,
which are Jacobian-vector products: no data point's full Jacobian is formed. Under the Gaussian
likelihood the posterior over the ``K`` feature weights has covariance
``Σ = (Σ_n ψ(x_n) ψ(x_n)ᵀ / σ² + δ I)⁻¹`` (summed over all training inputs) and the epistemic
function variance is ``ψ(x)ᵀ Σ ψ(x)``.

Defaults ``M = 2000, K = 20`` are the paper's CIFAR-10 and ImageNet settings (the paper has no
tabular-regression setting of its own), capped at the training-set size when not given. :func:`exact_lla_variance` is the exact, full-Jacobian
linearised Laplace variance for tiny networks, against which the tests check ELLA.

:func:`fit_ella_classifier` is the paper's ``C``-class version: the NTK over (input, class)
pairs, so ``M`` Nyström inputs give ``M·C`` Jacobian rows, the features ``ψ(x) = J(x) V`` are
``C x K``, and the posterior uses the softmax GGN ``Σ = (Σ_n ψ_nᵀ Λ_n ψ_n + δ I)⁻¹`` with
``Λ_n = diag(p_n) - p_n p_nᵀ``. :func:`exact_lla_logit_variance` is its exact reference. The Gram
matrix of the ``M·C`` rows is formed in panels of at most :data:`_JACOBIAN_BUDGET` bytes of
Jacobian rows, so ``J_M`` never has to be held whole.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap
from tqdm.auto import tqdm

from gapa.errors import ConfigurationError
from gapa.moments import Moments
from gapa.predictive.classification import probit

from ..data import RegressionData
from ..data.images import ImageData
from . import Fitted
from .scores import fit_logit_predictive

__all__ = [
    "EllaClassifier",
    "exact_lla_logit_variance",
    "exact_lla_variance",
    "fit_ella",
    "fit_ella_classifier",
]

#: Noise variances σ² tried on validation (standardised target units): 10^-6 ... 10^1.
SIGMA2_GRID = torch.logspace(-6.0, 1.0, 36, dtype=torch.float64)
#: Prior precisions δ tried on validation: 10^-8 ... 10^6, four per decade. Widened from
#: 10^-4 when the flights records all chose its bottom end: there the validation NLL falls
#: monotonically as δ -> 0 towards the data-only limit (the GGN swamps the prior; on flights the
#: NLL differs by < 10^-6 between 10^-12 and 10^3), so no grid makes the optimum interior, and
#: the record says so (``prior_precision_interior``, ``val_nll_span``).
PRIOR_PRECISION_GRID = torch.logspace(-8.0, 6.0, 57, dtype=torch.float64)

#: ``M`` and ``K`` when not given: the paper's settings, capped at ``n_train`` and ``M`` so the
#: benchmark's small data sets run with the defaults (explicit values are never capped).
DEFAULT_M, DEFAULT_K = 2000, 20

#: Jacobian rows ``M·C`` of the classifier's Nyström inputs when ``m`` is not given: the ``2000``
#: rows of the regression default, i.e. ``M = 2000 // C`` inputs (200 for 10 classes). The paper's
#: ``M = 2000`` inputs of 10 classes would be 20,000 rows: a 20k x 20k float64 eigenproblem and
#: ``(MC)²P ≈ 8·10¹³`` multiply-adds for the Gram matrix of a 200k-parameter network, hours on
#: two CPU cores, where 2,000 rows take about a minute and still give 100 rows per kept eigenpair.
DEFAULT_CLASSIFIER_ROWS = DEFAULT_M

#: Prior precisions δ the classifier tries first on validation: 10^-4 ... 10^6, four per decade.
#: When the best lies at an end, that end is widened by :data:`PRIOR_WIDEN_DECADES` decades (same
#: density), at most :data:`PRIOR_MAX_WIDENINGS` times, so that an interior optimum is found
#: wherever it lies. On the Fashion-MNIST MLP the first grid chose its bottom end (10^-4 on all
#: three seeds; benchmarks/results/fmnist-mlp-b.json), and widened to 10^-16 (seed 0, M = 200,
#: K = 20) the validation NLL is flat to 10^-10 nats below about 10^-12 (span 2.2·10^-4 nats
#: over the grid): as for regression, it falls towards the data-only limit δ -> 0, where the GGN
#: swamps the prior, and no grid has an interior optimum. The record says which
#: (``prior_precision_interior``, ``prior_precision_grid``, ``prior_val_nll_span``); the
#: variance scale fitted afterwards (15 there) sets the variance's level either way.
CLASSIFIER_PRIOR_PRECISION_GRID = torch.logspace(-4.0, 6.0, 41, dtype=torch.float64)
PRIOR_PER_DECADE = 4
PRIOR_WIDEN_DECADES = 4
PRIOR_MAX_WIDENINGS = 3
#: Validation NLLs (nats) within this of the minimum count as attaining it: an end of the grid
#: where the NLL has flattened to rounding (e.g. δ so large that the variance no longer moves
#: the probabilities) is an end optimum, not a reason to call the choice interior.
PRIOR_NLL_TIE = 1e-10

_JACOBIAN_CHUNK = 256  # rows per per-example Jacobian chunk: 256 x 82k float32 is ~84 MB
_JVP_BATCH = 4096  # rows per JVP batch; K tangent activations of 200 units stay ~65 MB
#: Bytes of Nyström Jacobian rows held at once: when ``J_M`` is larger, its Gram matrix is built
#: panel by panel (one panel held, the later rows streamed in chunks) and ``J_Mᵀ U`` is
#: accumulated over chunks, so memory stays at one panel plus one chunk whatever ``M·C`` is.
_JACOBIAN_BUDGET = 1 << 30
#: Tangent activations (elements) one classifier JVP batch may hold: ``K`` copies of every
#: module output per row. Gives ~700 rows for the 2x200 MLP and ~6 for SmallResNet at K = 20,
#: near the fastest batch sizes measured on the CPU for both (larger batches thrash the cache).
_TANGENT_BUDGET = 1 << 25


def _load_forward_ad() -> None:
    """Run one trivial JVP so PyTorch loads its forward-AD decompositions here, where the
    ``torch.jit.script`` DeprecationWarning that loading emits in torch >= 2.10 (an internal
    detail no caller can act on) is silenced; later JVPs find them loaded."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit\.script.*", DeprecationWarning)
        jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))


class _Linearised:
    """A frozen copy of a network, seen as a function of its flattened parameters."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model)
        self.params = {n: p.detach() for n, p in self.model.named_parameters()}
        self.buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        self.shapes = [p.shape for p in self.params.values()]
        self.sizes = [p.numel() for p in self.params.values()]
        self.n_params = sum(self.sizes)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        _load_forward_ad()

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (params, self.buffers), (x,))

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``(..., P)`` into parameter-shaped pieces ``(..., *shape)``."""
        pieces = flat.split(self.sizes, dim=-1)
        return {
            n: piece.reshape(*flat.shape[:-1], *shape)
            for n, piece, shape in zip(self.params, pieces, self.shapes, strict=True)
        }

    def jacobian(
        self, x: torch.Tensor, *, n_outputs: int = 1, progress: bool = False
    ) -> torch.Tensor:
        """Per-example Jacobians ``(n · n_outputs, P)`` of the outputs, rows example-major
        (row ``i · C + c`` is output ``c`` of input ``i``), in chunks of at most
        :data:`_JACOBIAN_CHUNK` rows; used for the ``M`` Nyström points and the exact
        references only."""

        def outputs(params: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            out = self(params, xi.unsqueeze(0))
            return out.reshape(()) if n_outputs == 1 else out.reshape(n_outputs)

        per_example = vmap(jacrev(outputs), in_dims=(None, 0))
        x = x.to(self.device, self.dtype)
        out = torch.empty(len(x) * n_outputs, self.n_params, dtype=self.dtype, device=self.device)
        chunk = max(1, _JACOBIAN_CHUNK // n_outputs)  # inputs per chunk
        starts = range(0, len(x), chunk)
        for start in tqdm(starts, desc="ELLA Jacobians", disable=not progress, leave=False):
            grads = per_example(self.params, x[start : start + chunk])
            n_rows = len(x[start : start + chunk]) * n_outputs
            rows = [grads[n].reshape(n_rows, -1) for n in self.params]
            out[start * n_outputs : start * n_outputs + n_rows] = torch.cat(rows, dim=1)
        return out

    def jvp(self, x: torch.Tensor, directions: dict[str, torch.Tensor]) -> torch.Tensor:
        """``J(x) V`` as ``(n · C, K)`` (rows example-major, as :meth:`jacobian`) for ``K``
        stacked tangent directions, by forward mode."""

        def along(tangent: dict[str, torch.Tensor]) -> torch.Tensor:
            return jvp(lambda p: self(p, x), (self.params,), (tangent,))[1].reshape(-1)

        return vmap(along)(directions).T


def _check_single_output(lin: _Linearised, x: torch.Tensor, method: str = "ELLA") -> None:
    """Raise unless the regressor maps one row of ``x`` to ``(1, 1)`` (also VaLLA's check)."""
    with torch.no_grad():
        out = lin.model(x[:1].to(lin.device, lin.dtype))
    if out.shape != (1, 1):
        raise ConfigurationError(
            f"{method} here handles single-output regressors with output (N, 1); this model "
            f"returns {tuple(out.shape)} for one row."
        )


def _nystrom_directions(
    lin: _Linearised,
    x_m: torch.Tensor,
    k: int,
    *,
    n_outputs: int = 1,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``V = J_Mᵀ U_K Λ_K^{-1/2}`` as ``(P, K_used)`` in the model dtype, and the kept ``λ``.

    ``J_M`` stacks the ``n_outputs`` Jacobian rows of each of the ``M`` inputs. Eigenvalues at or
    below ``λ_max · M·C · eps`` (the usual numerical-rank cut for a Gram matrix formed in the
    Jacobian's precision) are noise, and their ``λ^{-1/2}`` would amplify it: drop them, so
    ``K_used ≤ K``. When ``J_M`` exceeds :data:`_JACOBIAN_BUDGET` bytes it is never held whole:
    :func:`_streamed_gram` builds the Gram matrix in panels and ``J_Mᵀ (U Λ^{-1/2})`` is summed
    over chunks of recomputed rows.
    """
    row_bytes = lin.n_params * torch.finfo(lin.dtype).bits // 8
    panel = max(1, _JACOBIAN_BUDGET // (row_bytes * n_outputs))  # inputs per held panel
    if panel >= len(x_m):  # J_M fits the budget: form it once
        jac = lin.jacobian(x_m, n_outputs=n_outputs, progress=progress)
        gram = (jac @ jac.T).double().cpu()  # the MC x MC eigenproblem runs in float64 on the CPU
        evals, scaled = _top_eigenpairs(gram, k, lin)
        return jac.T @ scaled, evals
    gram, start, held = _streamed_gram(lin, x_m, panel, n_outputs, progress=progress)
    evals, scaled = _top_eigenpairs(gram, k, lin)
    directions = held.T @ scaled[start * n_outputs :]
    del held
    chunk = max(1, _JACOBIAN_CHUNK // n_outputs)
    for a in tqdm(range(0, start, chunk), desc="ELLA directions", disable=not progress,
                  leave=False):
        b = min(a + chunk, start)
        jac = lin.jacobian(x_m[a:b], n_outputs=n_outputs)
        directions += jac.T @ scaled[a * n_outputs : b * n_outputs]
    return directions, evals


def _streamed_gram(
    lin: _Linearised, x_m: torch.Tensor, panel: int, n_outputs: int, *, progress: bool = False
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``J_M J_Mᵀ`` (float64, CPU) with at most one panel of ``panel`` inputs' Jacobian rows and
    one chunk held: each panel's diagonal block, then its blocks against every later chunk
    (mirrored). Returns the Gram matrix, the first input of the last panel and that panel's
    Jacobian rows, which the caller reuses rather than recomputes."""
    c, m = n_outputs, len(x_m)
    gram = torch.zeros(m * c, m * c, dtype=torch.float64)
    chunk = max(1, _JACOBIAN_CHUNK // c)
    starts = range(0, m, panel)
    for a in tqdm(starts, desc="ELLA Gram panels", disable=not progress, leave=False):
        b = min(a + panel, m)
        held = lin.jacobian(x_m[a:b], n_outputs=c)
        gram[a * c : b * c, a * c : b * c] = (held @ held.T).double().cpu()
        for s in range(b, m, chunk):
            e = min(s + chunk, m)
            block = (held @ lin.jacobian(x_m[s:e], n_outputs=c).T).double().cpu()
            gram[a * c : b * c, s * c : e * c] = block
            gram[s * c : e * c, a * c : b * c] = block.T
    return gram, a, held


def _top_eigenpairs(
    gram: torch.Tensor, k: int, lin: _Linearised
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept top-``k`` eigenvalues of the float64 Gram matrix and ``U Λ^{-1/2}`` in the model
    dtype and device (see :func:`_nystrom_directions` for the rank cut)."""
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)  # ascending
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    tol = evals[0].clamp(min=0) * len(gram) * torch.finfo(lin.dtype).eps
    keep = evals > tol
    if not keep.any():
        raise ConfigurationError(
            "the NTK Gram matrix of the Nyström points is numerically zero; the network's output "
            "does not depend on its parameters there."
        )
    evals, evecs = evals[keep], evecs[:, keep]
    return evals, (evecs / evals.sqrt()).to(lin.device, lin.dtype)


def _feature_batches(
    lin: _Linearised,
    directions: torch.Tensor,
    x: torch.Tensor,
    *,
    batch: int = _JVP_BATCH,
    progress: bool = False,
    desc: str = "ELLA features",
):
    """Yield ``(x_b, ψ(x_b))`` per batch of ``batch`` inputs, ``ψ`` as ``(n_b · C, K)``."""
    tangents = lin.unflatten(directions.T.contiguous())
    x = x.to(lin.device, lin.dtype)
    starts = range(0, len(x), batch)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        xb = x[start : start + batch]
        yield xb, lin.jvp(xb, tangents)


def _features(
    lin: _Linearised,
    directions: torch.Tensor,
    x: torch.Tensor,
    *,
    batch: int = _JVP_BATCH,
    progress: bool = False,
    desc: str = "ELLA features",
) -> torch.Tensor:
    """Nyström features ``ψ(x) = J(x) V`` as ``(n · C, K)`` in the model dtype, batched JVPs."""
    parts = [f for _, f in _feature_batches(lin, directions, x, batch=batch, progress=progress,
                                            desc=desc)]
    if not parts:
        return torch.empty(0, directions.shape[1], dtype=lin.dtype, device=lin.device)
    return torch.cat(parts)


def _gram(features: torch.Tensor) -> torch.Tensor:
    """``Σ_n ψ(x_n) ψ(x_n)ᵀ`` in float64 on the CPU, accumulated per batch."""
    k = features.shape[1]
    out = torch.zeros(k, k, dtype=torch.float64)
    for batch in features.split(_JVP_BATCH):
        b = batch.double().cpu()
        out += b.T @ b
    return out


def _posterior_covariance(gram: torch.Tensor, sigma2: float, delta: float) -> torch.Tensor:
    """``Σ = (G / σ² + δ I)⁻¹`` in float64, through the eigenbasis of ``G``."""
    g, q = torch.linalg.eigh(gram)
    return (q / (g.clamp(min=0) / sigma2 + delta)) @ q.T


def _variance(features: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``ψ(x)ᵀ Σ ψ(x)`` per row, float64 ``(n,)`` on the CPU."""
    f = features.double().cpu()
    return ((f @ cov) * f).sum(dim=1).clamp(min=0)


def _grid_variances(gram: torch.Tensor, features: torch.Tensor):
    """A function of ``σ²`` giving ``ψᵀΣψ`` per feature row for every δ of
    :data:`PRIOR_PRECISION_GRID`, ``(rows, n_δ)`` float64, ``Σ = (G/σ² + δ I)⁻¹``.

    In G's eigenbasis, ``ψᵀΣψ = Σ_k z_k² / (g_k/σ² + δ)`` with ``z = qᵀψ``: one eigendecomposition,
    then one matmul per ``σ²``.
    """
    g, q = torch.linalg.eigh(gram)
    g = g.clamp(min=0)
    z2 = (features.double().cpu() @ q) ** 2

    def at(sigma2: float) -> torch.Tensor:
        return z2 @ (1.0 / (g[:, None] / sigma2 + PRIOR_PRECISION_GRID[None, :]))

    return at


def _select_hyperparameters(
    gram: torch.Tensor, features_val: torch.Tensor, residual_val: torch.Tensor
) -> tuple[float, float, float]:
    """``(σ², δ, span)`` on :data:`SIGMA2_GRID` x :data:`PRIOR_PRECISION_GRID` minimising the
    mean Gaussian NLL of the validation residuals under variance ``ψᵀΣψ + σ²``; ``span`` is how
    much that NLL varies over the δ grid at the chosen σ² (how much δ mattered at all)."""
    grid_variances = _grid_variances(gram, features_val)
    r2 = residual_val.double().cpu().reshape(-1, 1) ** 2
    best = (math.inf, 0.0, 0.0, 0.0)
    for sigma2 in SIGMA2_GRID.tolist():
        var = grid_variances(sigma2) + sigma2
        nll = 0.5 * (torch.log(2 * math.pi * var) + r2 / var).mean(dim=0)
        i = int(nll.argmin())
        if nll[i] < best[0]:
            span = float(nll.max() - nll.min())
            best = (float(nll[i]), sigma2, float(PRIOR_PRECISION_GRID[i]), span)
    return best[1], best[2], best[3]


def _check_sizes(m: int, k: int, n_train: int, n_outputs: int = 1) -> None:
    for name, value in (("m", m), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"ELLA: {name} must be a positive integer, got {value!r}.")
    if n_outputs == 1 and not k <= m <= n_train:
        raise ConfigurationError(
            f"ELLA needs k <= m <= n_train, got k={k}, m={m}, n_train={n_train}: K eigenpairs "
            "come from the Gram matrix of M training inputs."
        )
    if not (k <= m * n_outputs and m <= n_train):
        raise ConfigurationError(
            f"ELLA needs k <= m * C and m <= n_train, got k={k}, m={m}, C={n_outputs}, "
            f"n_train={n_train}: K eigenpairs come from the Gram matrix of the M·C (input, class) "
            "rows of M training inputs."
        )


def fit_ella(
    backbone: nn.Module,
    data: RegressionData,
    *,
    seed: int = 0,
    progress: bool = False,
    train: dict | None = None,
    m: int | None = None,
    k: int | None = None,
) -> Fitted:
    """Fit ELLA post hoc to the frozen single-output ``backbone`` trained on ``data``.

    ``M = m`` Nyström points (default ``min(2000, n_train)``) are drawn from the training inputs
    with ``torch.Generator`` seeded by ``seed``; ``k`` is the number of eigenpairs (default
    ``min(20, M)``; fewer are used when the Gram matrix is numerically rank-deficient:
    ``info["k_used"]``). Explicit values must satisfy ``1 <= k <= m <= n_train``. The GGN over the ``K`` features sums over
    every training input. ``σ²`` and ``δ`` minimise the validation NLL over the grid
    ``σ² ∈ 10^{-6..1}`` (five per decade) x ``δ ∈ 10^{-4..6}`` (four per decade); when the GGN
    swamps the prior (``G/σ² ≫ δ``, large ``n``) the NLL is flat in ``δ`` and the first, smallest
    δ of equal NLL is reported, the variance being insensitive to it. ``train`` is
    accepted for the common interface and unused: nothing is trained. The returned variance is
    the epistemic ``ψᵀΣψ`` alone; the mean is ``backbone(x)`` itself.
    """
    del train
    n_train = len(data.x_train)
    m = min(DEFAULT_M, n_train) if m is None else m
    k = min(DEFAULT_K, m) if k is None and isinstance(m, int) else k
    _check_sizes(m, k, n_train)
    lin = _Linearised(backbone)
    _check_single_output(lin, data.x_train)

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.x_train), generator=gen)[:m]
    directions, _ = _nystrom_directions(lin, data.x_train[idx], k, progress=progress)

    gram = _gram(_features(lin, directions, data.x_train, progress=progress))
    features_val = _features(lin, directions, data.x_val, progress=progress, desc="ELLA val")
    with torch.no_grad():
        mean_val = lin.model(data.x_val.to(lin.device, lin.dtype))
    residual_val = data.y_val.double() - mean_val.double().cpu()
    sigma2, delta, span = _select_hyperparameters(gram, features_val, residual_val)
    cov = _posterior_covariance(gram, sigma2, delta)

    def predict(x: torch.Tensor) -> Moments:
        with torch.no_grad():
            mean = lin.model(x)
        var = _variance(_features(lin, directions, x, progress=progress, desc="ELLA predict"), cov)
        return Moments(mean, var.to(mean.device, mean.dtype).reshape(mean.shape))

    info = {
        "m": m,
        "k": k,
        "prior_precision": delta,
        "prior_precision_grid": [PRIOR_PRECISION_GRID[0].item(), PRIOR_PRECISION_GRID[-1].item()],
        "prior_precision_interior": PRIOR_PRECISION_GRID[0].item() < delta
        < PRIOR_PRECISION_GRID[-1].item(),
        "val_nll_span": span,
        "sigma2": sigma2,
        "k_used": int(directions.shape[1]),
    }
    return Fitted(predict=predict, info=info)


def exact_lla_variance(
    model: nn.Module,
    x_train: torch.Tensor,
    x_query: torch.Tensor,
    sigma2: float,
    prior_precision: float,
    *,
    max_params: int = 5000,
) -> torch.Tensor:
    """Exact linearised-Laplace function variance ``J_q (JᵀJ/σ² + δ I_P)⁻¹ J_qᵀ`` (diagonal,
    ``(n_query, 1)``, float64) from full Jacobians: a reference for tiny single-output networks.
    """
    lin = _Linearised(model)
    if lin.n_params > max_params:
        raise ConfigurationError(
            f"exact_lla_variance forms a {lin.n_params} x {lin.n_params} matrix; it is meant for "
            f"networks of at most max_params={max_params} parameters."
        )
    _check_single_output(lin, x_train)
    jac = lin.jacobian(x_train).double().cpu()
    jac_q = lin.jacobian(x_query).double().cpu()
    eye = torch.eye(lin.n_params, dtype=torch.float64)
    precision = jac.T @ jac / sigma2 + prior_precision * eye
    chol = torch.linalg.cholesky(precision)
    half = torch.linalg.solve_triangular(chol, jac_q.T, upper=False)  # L⁻¹ J_qᵀ
    return (half**2).sum(dim=0).reshape(-1, 1)


# --------------------------------------------------------------------------- classification


def _check_classifier(lin: _Linearised, backbone: nn.Module, data: ImageData,
                      method: str = "ELLA") -> int:
    """The number of classes ``C``; raises unless the backbone is in eval mode and maps one
    image to ``(1, C)`` logits with ``C = data.n_classes >= 2`` (also VaLLA's check)."""
    training = [name or type(backbone).__name__ for name, mod in backbone.named_modules()
                if mod.training]
    if training:
        raise ConfigurationError(
            f"{method} linearises the frozen classifier at its eval-mode function (batch norm on "
            f"its running statistics, no dropout); these modules are in training mode: "
            f"{', '.join(training[:5])}{' ...' if len(training) > 5 else ''}. Call .eval() first."
        )
    c = data.n_classes
    with torch.no_grad():
        out = lin.model(data.x_train[:1].to(lin.device, lin.dtype))
    if c < 2 or out.shape != (1, c):
        raise ConfigurationError(
            f"{method} classification needs logits (N, C) with C = data.n_classes = {c} >= 2; the "
            f"backbone returns {tuple(out.shape)} for one image."
        )
    return c


def _jvp_batch(lin: _Linearised, x: torch.Tensor, k: int) -> int:
    """Inputs per JVP batch so that ``k`` tangent copies of every module output stay within
    :data:`_TANGENT_BUDGET` elements (at most :data:`_JVP_BATCH`)."""
    sizes = [x[:1].numel()]
    leaves = [mod for mod in lin.model.modules() if not any(True for _ in mod.children())]
    hooks = [mod.register_forward_hook(
        lambda _m, _i, out: sizes.append(out.numel()) if isinstance(out, torch.Tensor) else None)
        for mod in leaves]
    try:
        with torch.no_grad():
            lin.model(x[:1].to(lin.device, lin.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, min(_JVP_BATCH, _TANGENT_BUDGET // (sum(sizes) * k)))


def _softmax_ggn_term(jac: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``Σ_n A_nᵀ Λ_n A_n`` in float64 on the CPU for rows ``A_n`` of ``jac`` (``(n · C, D)``,
    example-major) and ``Λ_n = diag(p_n) - p_n p_nᵀ``, ``p_n = softmax(logits_n)``.

    Formed as ``Σ_c p_nc (a_nc - ā_n)(a_nc - ā_n)ᵀ`` with ``ā_n = Σ_c p_nc a_nc``, the same matrix
    written as a sum of PSD terms (no cancellation between ``diag(p)`` and ``ppᵀ``).
    """
    n, c = logits.shape
    a = jac.double().cpu().reshape(n, c, -1)
    p = torch.softmax(logits.double().cpu(), dim=-1)
    centred = a - torch.einsum("nc,ncd->nd", p, a)[:, None, :]
    weighted = (centred * p.sqrt()[..., None]).reshape(n * c, -1)
    return weighted.T @ weighted


def _probit_log_probs(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``log softmax(μ_c / sqrt(1 + π var_c / 8))``: the log of :func:`gapa.predictive.classification.probit`
    without underflow, for the validation NLL."""
    return torch.log_softmax(mean / torch.sqrt(1.0 + (math.pi / 8.0) * var), dim=-1)


@dataclass(frozen=True)
class PriorChoice:
    """The classifier's prior precision and how it was chosen (:func:`_select_prior_precision`)."""

    delta: float
    """The chosen δ."""
    val_nll: float
    """The per-class probit's validation NLL at ``delta`` (variance scale 1)."""
    val_nll_map: float
    """The MAP softmax's validation NLL."""
    grid: list[float]
    """Every δ tried, ascending (the declared grid and its widenings)."""
    widenings: int
    """How many times an end of the grid was widened."""
    span: float
    """Largest minus smallest validation NLL over ``grid``: how much δ mattered at all."""
    interior: bool
    """Whether both ends of ``grid`` have a validation NLL above the minimum (by more than
    :data:`PRIOR_NLL_TIE`); else the NLL kept falling, or stayed flat, towards an end even
    after the widenings."""


def _select_prior_precision(
    gram: torch.Tensor, features_val: torch.Tensor, logits_val: torch.Tensor, y_val: torch.Tensor
) -> PriorChoice:
    """δ minimising the per-class probit NLL of ``y_val`` (the first of equal NLL, i.e. the
    smallest δ, on ties) over :data:`CLASSIFIER_PRIOR_PRECISION_GRID`, widened at each end that
    attains the minimum (to :data:`PRIOR_NLL_TIE`; by :data:`PRIOR_WIDEN_DECADES` decades, at
    most :data:`PRIOR_MAX_WIDENINGS` times) until the minimum is interior.

    In the GGN's eigenbasis ``ψᵀΣψ = Σ_k z_k² / (g_k + δ)`` with ``z = qᵀψ``: one
    eigendecomposition, then one matmul per batch of δ values.
    """
    n, c = logits_val.shape
    g, q = torch.linalg.eigh(gram)
    g = g.clamp(min=0)
    z2 = (features_val.double().cpu() @ q) ** 2
    mean = logits_val.double().cpu()
    y = y_val.cpu().reshape(-1, 1)

    def nll_at(deltas: torch.Tensor) -> torch.Tensor:
        if len(deltas) == 0:
            return deltas
        var = (z2 @ (1.0 / (g[:, None] + deltas[None, :]))).reshape(n, c, -1)
        return torch.stack([-_probit_log_probs(mean, var[..., j]).gather(1, y).mean()
                            for j in range(len(deltas))])

    def ends_at_minimum(nll: torch.Tensor) -> tuple[bool, bool]:
        best = float(nll.min())
        return float(nll[0]) <= best + PRIOR_NLL_TIE, float(nll[-1]) <= best + PRIOR_NLL_TIE

    grid = CLASSIFIER_PRIOR_PRECISION_GRID.clone()
    nll = nll_at(grid)
    widenings = 0
    step = 1.0 / PRIOR_PER_DECADE
    added = torch.arange(1, PRIOR_WIDEN_DECADES * PRIOR_PER_DECADE + 1, dtype=torch.float64)
    while widenings < PRIOR_MAX_WIDENINGS:
        low, high = ends_at_minimum(nll)
        if not (low or high):
            break
        below = 10.0 ** (grid[0].log10() - step * added.flip(0)) if low else grid[:0]
        above = 10.0 ** (grid[-1].log10() + step * added) if high else grid[:0]
        nll = torch.cat([nll_at(below), nll, nll_at(above)])
        grid = torch.cat([below, grid, above])
        widenings += 1
    i = int(nll.argmin())
    nll_map = float(-torch.log_softmax(mean, dim=-1).gather(1, y).mean())
    return PriorChoice(float(grid[i]), float(nll[i]), nll_map, grid.tolist(), widenings,
                       float(nll.max() - nll.min()), not any(ends_at_minimum(nll)))


class EllaClassifier:
    """A fitted ELLA classifier: the Nyström directions ``V`` ``(P, K)``, the GGN
    ``Σ_n ψ_nᵀ Λ_n ψ_n`` ``(K, K)`` of the training set, the prior precision δ and the
    posterior covariance ``Σ = (GGN + δ I)⁻¹`` of the feature weights, and batched predictions.

    Inputs go through the network in batches of ``batch`` images (the JVP batch of the fit), so
    memory stays bounded whatever ``len(x)``; each batch's mean logits are the backbone's own
    output on that batch, bit for bit (one batch, hence ``backbone(x)`` itself, for inputs of
    at most ``batch`` rows).
    """

    def __init__(self, lin: _Linearised, directions: torch.Tensor, ggn: torch.Tensor,
                 prior_precision: float, batch: int, progress: bool = False):
        self.lin, self.directions, self.ggn = lin, directions, ggn
        self.prior_precision = prior_precision
        self.cov = _posterior_covariance(ggn, 1.0, prior_precision)
        self.batch, self.progress = batch, progress

    def _batches(self, x: torch.Tensor, desc: str):
        """``(mean, var)`` per batch: the backbone's logits and the ELLA logit variances
        ``diag(ψ Σ ψᵀ)``, both ``(n_b, C)`` in the model dtype."""
        for xb, psi in _feature_batches(self.lin, self.directions, x, batch=self.batch,
                                        progress=self.progress, desc=desc):
            with torch.no_grad():
                mean = self.lin.model(xb)
            var = _variance(psi, self.cov).reshape(mean.shape)
            yield mean, var.to(mean.device, mean.dtype)

    def logit_moments(self, x: torch.Tensor) -> Moments:
        """Mean logits (the backbone's) and ELLA logit variances, ``(N, C)`` each."""
        return Moments.cat([Moments(*p) for p in self._batches(x, "ELLA logits")])

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``softmax(μ_c / sqrt(1 + π var_c / 8))``, ``(N, C)``."""
        return torch.cat([probit(mean, var) for mean, var in self._batches(x, "ELLA predict")])


def fit_ella_classifier(
    backbone: nn.Module,
    data: ImageData,
    *,
    seed: int = 0,
    progress: bool = False,
    train: dict | None = None,
    m: int | None = None,
    k: int | None = None,
) -> Fitted:
    """Fit ELLA post hoc to the frozen ``C``-class ``backbone`` (eval mode, logits ``(N, C)``).

    ``M = m`` Nyström inputs (default ``min(2000 // C, n_train)``, i.e. ~2000 Jacobian rows; see
    :data:`DEFAULT_CLASSIFIER_ROWS`) are drawn from the training inputs with ``torch.Generator``
    seeded by ``seed``; their ``M·C`` per-class Jacobian rows give the Gram matrix
    ``J_M J_Mᵀ``, whose top ``k`` eigenpairs (default ``min(20, M·C)``; fewer when numerically
    rank-deficient: ``info["k_used"]``) give ``V = J_Mᵀ U Λ^{-1/2}`` and the ``C x K`` features
    ``ψ(x) = J(x) V`` by ``K`` JVPs. Explicit sizes must satisfy ``1 <= k <= m·C``,
    ``m <= n_train``. The posterior over the ``K`` weights is
    ``Σ = (Σ_n ψ_nᵀ Λ_n ψ_n + δ I)⁻¹`` with the softmax GGN ``Λ_n = diag(p_n) - p_n p_nᵀ`` at
    the MAP probabilities, summed over every training input (in batches); the prior precision
    δ minimises the validation NLL of the per-class probit predictive over
    :data:`CLASSIFIER_PRIOR_PRECISION_GRID`, widened at an end where the minimum lies
    (:func:`_select_prior_precision`; the smallest δ on ties). The prediction is the benchmark's
    for every method with logit moments
    (:func:`gapa_bench.baselines.scores.fit_logit_predictive`): ``μ`` the backbone's own logits
    and ``var`` the diagonal of ``ψ(x) Σ ψ(x)ᵀ``, computed in batches, one variance scale fitted
    on validation NLL and GAPA's default predictive at that scale; ``ood_scores`` holds the
    summed raw logit variance. ``Fitted.handle`` is the :class:`EllaClassifier`
    (``logit_moments`` gives ``μ`` and ``var``; ``predict_proba`` its unscaled per-class probit).
    ``train`` is accepted for the common interface and unused. The backbone is deep-copied and
    never modified.
    """
    del train
    lin = _Linearised(backbone)
    c = _check_classifier(lin, backbone, data)
    n_train = len(data.x_train)
    m = min(max(1, DEFAULT_CLASSIFIER_ROWS // c), n_train) if m is None else m
    k = min(DEFAULT_K, m * c) if k is None and isinstance(m, int) else k
    _check_sizes(m, k, n_train, n_outputs=c)

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_train, generator=gen)[:m]
    directions, _ = _nystrom_directions(lin, data.x_train[idx], k, n_outputs=c,
                                        progress=progress)
    batch = _jvp_batch(lin, data.x_train, directions.shape[1])

    gram = torch.zeros(directions.shape[1], directions.shape[1], dtype=torch.float64)
    for xb, psi in _feature_batches(lin, directions, data.x_train, batch=batch,
                                    progress=progress, desc="ELLA GGN"):
        with torch.no_grad():
            gram += _softmax_ggn_term(psi, lin.model(xb))
    features_val = _features(lin, directions, data.x_val, batch=batch, progress=progress,
                             desc="ELLA val")
    with torch.no_grad():
        logits_val = torch.cat([lin.model(xb) for xb in
                                data.x_val.to(lin.device, lin.dtype).split(batch)])
    prior = _select_prior_precision(gram, features_val, logits_val, data.y_val)
    handle = EllaClassifier(lin, directions, gram, prior.delta, batch, progress)
    info = {
        "m": m,
        "k": k,
        "k_used": int(directions.shape[1]),
        "prior_precision": prior.delta,
        "prior_precision_grid": [prior.grid[0], prior.grid[-1]],
        "prior_precision_interior": prior.interior,
        "prior_grid_widenings": prior.widenings,
        "prior_val_nll": prior.val_nll,
        "prior_val_nll_span": prior.span,
        "nystrom_rows": m * c,
        "jvp_batch": batch,
    }
    var_val = _variance(features_val, handle.cov).reshape(logits_val.shape)
    val_moments = Moments(logits_val, var_val.to(logits_val.device, logits_val.dtype))
    return fit_logit_predictive(handle.logit_moments, data.x_val, data.y_val, info=info,
                                handle=handle, val_moments=val_moments)


def exact_lla_logit_variance(
    model: nn.Module,
    x_train: torch.Tensor,
    x_query: torch.Tensor,
    prior_precision: float,
    *,
    max_params: int = 5000,
) -> torch.Tensor:
    """Exact linearised-Laplace logit variances of a ``C``-class classifier: the diagonal of
    ``J_q (Σ_n J_nᵀ Λ_n J_n + δ I_P)⁻¹ J_qᵀ``, ``(n_query, C)`` float64, from full Jacobians, with
    ``Λ_n = diag(p_n) - p_n p_nᵀ`` at the model's softmax. A reference for tiny networks."""
    lin = _Linearised(model)
    if lin.n_params > max_params:
        raise ConfigurationError(
            f"exact_lla_logit_variance forms a {lin.n_params} x {lin.n_params} matrix; it is "
            f"meant for networks of at most max_params={max_params} parameters."
        )
    with torch.no_grad():
        logits = lin.model(x_train.to(lin.device, lin.dtype))
    n, c = logits.shape
    jac = lin.jacobian(x_train, n_outputs=c).double().cpu().reshape(n, c, -1)
    jac_q = lin.jacobian(x_query, n_outputs=c).double().cpu()
    p = torch.softmax(logits.double().cpu(), dim=-1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, lam, jac)
    precision = ggn + prior_precision * torch.eye(lin.n_params, dtype=torch.float64)
    chol = torch.linalg.cholesky((precision + precision.T) / 2)
    half = torch.linalg.solve_triangular(chol, jac_q.T, upper=False)  # L⁻¹ J_qᵀ
    return (half**2).sum(dim=0).reshape(len(x_query), c)
