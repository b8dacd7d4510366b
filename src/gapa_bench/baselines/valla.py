"""VaLLA: the variational linearised Laplace approximation, a fixed-mean sparse variational GP.

Ortega, Santana & Hernández-Lobato, "Variational Linearized Laplace Approximation for Bayesian
Deep Learning", ICML 2024. The linearised network with prior ``θ ~ N(θ*, δ⁻¹ I)`` is a GP whose
kernel is the NTK ``k((x, c), (x', c')) = J_c(x) · J_c'(x') / δ`` (``J_c`` the gradient of output
``c`` with respect to all weights at the MAP). VaLLA approximates its posterior by a sparse
variational GP whose *mean is the frozen network itself*; only the covariance is variational.

Inducing rows: ``M`` training inputs ``z_m`` drawn at random (seeded), each with one output
``c_m`` (``0`` for regression; ``m mod C`` for classification, so every class has ``M / C``
rows and ``K_ZZ`` is ``M x M``, not ``MC x MC``). With ``G = J_Z J_Zᵀ + ε I = L Lᵀ`` (float64,
relative jitter ``ε`` recorded) and the whitened variational posterior ``v = L⁻¹ u √δ ~ N(·, S)``,
``S = R Rᵀ`` (``R`` lower triangular, positive diagonal), every quantity is a function of the
whitened features ``ψ_c(x) = L⁻¹ J_Z J_c(x)ᵀ`` (``M``-vectors), which do not depend on ``δ``:

- predictive mean ``f(x, θ*)``, the backbone's output, bit for bit;
- predictive covariance ``Σ(x)_{cc'} = [J_c J_c'ᵀ - ψ_cᵀ ψ_c' + ψ_cᵀ S ψ_c'] / δ``, i.e.
  ``k(x,x) - k_xZ K_ZZ⁻¹ k_Zx + k_xZ K_ZZ⁻¹ S_u K_ZZ⁻¹ k_Zx`` with ``S_u = L S Lᵀ / δ``;
- ``KL(q(u) || p(u)) = ½ (tr S - M - log|S|)``: the mean's term is dropped, the mean being fixed
  to the network rather than a variational parameter (the fixed-mean construction).

The objective is the black-box α-energy ``Σ_i (1/α) log E_q[p(y_i | f_i)^α] - KL`` (Hernández-
Lobato et al., 2016) maximised by Adam over ``R``, ``log δ`` and, for regression, ``log σ²``, on
mini-batches (data term scaled by ``N / batch``). ``α → 0`` is the ELBO
``Σ_i E_q[log p(y_i | f_i)] - KL``; the default ``α = 1`` (the predictive log-likelihood) is
what the authors' released code uses by default, and it is the one that can fit ``δ``: with the
mean fixed and the mean's KL term gone, the ELBO rises monotonically with ``δ`` (in the whitened
form ``δ`` appears only as ``-E_q[variance]/δ``-type terms, and ``log softmax`` is concave, so
variance never helps the expected log-likelihood), so maximising it drives ``δ → ∞``, the
variance to zero. :func:`fit_valla` therefore refuses ``alpha = 0`` unless ``prior_precision``
is held fixed. With ``α = 0``, fixed ``δ, σ²`` and ``Z`` all ``N`` training inputs, the optimum
is ``S = (I + Ψᵀ Ψ / (δ σ²))⁻¹`` and the variance equals exact linearised Laplace's
``J_x (JᵀJ/σ² + δ I)⁻¹ J_xᵀ`` (Woodbury); the tests check that.

Regression likelihood ``N(y; f, σ²)``: the α-energy is closed form,
``(1/α)[-(α/2) log 2πσ² + ½ log(σ²/α) - ½ log(v + σ²/α) - r²/(2(v + σ²/α))]`` with residual
``r = y - f(x, θ*)`` and ``v`` the variance above (``α = 0``:
``-½ log 2πσ² - (r² + v)/(2σ²)``). Classification: ``softmax`` by Monte Carlo, ``S`` samples
``f = μ + (A ε₁ + Ψ R ε₂)/√δ`` per input (``A`` the Cholesky factor of the Nyström residual
``JJᵀ - ΨᵀΨ``), energy ``(1/α) log mean_s softmax(f_s)_y^α``. Inputs and noise come from a
``torch.Generator`` seeded by ``seed``.

Costs: one ``C x P`` Jacobian and a ``(C x P)(P x M)`` product per input. The objective is fitted
on at most ``fit_points`` training inputs (seeded subset; the data term still scaled to all
``N``), whose features are computed once; Adam then works on ``M x M`` matrices only. The
initial ``S`` is the Gaussian/GGN optimum at the initial hyperparameters,
``S⁻¹ = I + (N / n_fit) Σ_i Ψ_iᵀ Λ_i Ψ_i / δ₀`` (``Λ_i = 1/σ₀²`` for regression, the softmax
Hessian ``diag p - ppᵀ`` for classification), which is the ELBO's exact optimum for ``α = 0`` in
regression. ``Z`` stays fixed (learning it needs second derivatives of the network).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from gapa.errors import ConfigurationError, NumericalError
from gapa.moments import Moments

from ..data import RegressionData
from ..data.images import ImageData
from . import Fitted
from .ella import _check_classifier, _check_single_output, _Linearised
from .scores import fit_logit_predictive

__all__ = ["VallaClassifier", "fit_valla", "fit_valla_classifier"]

#: Adam settings: steps, learning rate, mini-batch size (all overridable per call).
DEFAULT_STEPS, DEFAULT_LR, DEFAULT_BATCH = 2000, 0.01, 256
CLASSIFIER_STEPS = 1000
#: Training inputs whose features the objective is fitted on (regression, classification).
FIT_POINTS, CLASSIFIER_FIT_POINTS = 20000, 2000
#: Monte Carlo samples of the softmax likelihood per input and step.
MC_SAMPLES = 16
#: Relative jitter on ``G`` (times its mean diagonal) to start from: ``100 eps`` of the model
#: dtype; multiplied by 10 until the Cholesky factorisation succeeds (at most 8 times).
JITTER_EPS_FACTOR, JITTER_TRIES = 100.0, 8
_CHUNK_ROWS = 256  # Jacobian rows (inputs x outputs) per chunk: bounded memory


@dataclass
class _Inducing:
    """The inducing rows: their Jacobians ``J_Z`` ``(M, P)`` (model dtype), the Cholesky factor
    ``L`` of ``J_Z J_Zᵀ + ε I`` (float64, CPU), the jitter ``ε`` (relative) and the outputs."""

    rows: torch.Tensor
    chol: torch.Tensor
    jitter: float
    classes: torch.Tensor
    n_outputs: int


def _inducing(lin: _Linearised, x_z: torch.Tensor, classes: torch.Tensor,
              n_outputs: int) -> _Inducing:
    jac = lin.jacobian(x_z, n_outputs=n_outputs)
    rows = jac[torch.arange(len(x_z), device=jac.device) * n_outputs + classes.to(jac.device)]
    del jac
    gram = (rows @ rows.T).double().cpu()
    gram = (gram + gram.T) / 2
    scale = float(gram.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0:
        raise NumericalError(f"VaLLA: the inducing Jacobians have mean squared norm {scale}; the "
                             "network's outputs do not depend on its weights at these inputs.")
    eps = JITTER_EPS_FACTOR * torch.finfo(lin.dtype).eps
    eye = torch.eye(len(gram), dtype=torch.float64)
    for _ in range(JITTER_TRIES):
        chol, info = torch.linalg.cholesky_ex(gram + eps * scale * eye)
        if int(info) == 0:
            return _Inducing(rows, chol, eps, classes.cpu(), n_outputs)
        eps *= 10.0
    raise NumericalError(f"VaLLA: J_Z J_Zᵀ is not positive definite even with relative jitter "
                         f"{eps / 10:g}.")


def _feature_chunks(lin: _Linearised, ind: _Inducing, x: torch.Tensor, *, full: bool,
                    progress: bool = False, desc: str = "VaLLA features"):
    """Per chunk of inputs: ``(x_chunk, ψ (n, C, M), kxx)`` float64 on the CPU, with ``kxx`` the
    NTK block ``J Jᵀ`` ``(n, C, C)`` when ``full`` else its diagonal ``(n, C)``."""
    c = ind.n_outputs
    step = max(1, _CHUNK_ROWS // c)
    x = x.to(lin.device, lin.dtype)
    for xb in tqdm(x.split(step), desc=desc, disable=not progress, leave=False):
        jac = lin.jacobian(xb, n_outputs=c)  # (n·C, P), example-major
        phi = (jac @ ind.rows.T).double().cpu()  # (n·C, M)
        psi = torch.linalg.solve_triangular(ind.chol, phi.T, upper=False).T
        j3 = jac.reshape(len(xb), c, -1)
        kxx = (j3 @ j3.transpose(1, 2)) if full else (j3 * j3).sum(-1)
        yield xb, psi.reshape(len(xb), c, -1), kxx.double().cpu()


class _Posterior(nn.Module):
    """``R`` (whitened ``S = R Rᵀ``), ``log δ`` and ``log σ²`` as float64 parameters."""

    def __init__(self, s_init: torch.Tensor, delta: float, sigma2: float | None):
        super().__init__()
        r = torch.linalg.cholesky(s_init)
        self.lower = nn.Parameter(torch.tril(r, -1))
        self.log_diag = nn.Parameter(r.diagonal().log())
        self.log_delta = nn.Parameter(torch.tensor(math.log(delta), dtype=torch.float64))
        self.log_sigma2 = (None if sigma2 is None else
                           nn.Parameter(torch.tensor(math.log(sigma2), dtype=torch.float64)))

    def factor(self) -> torch.Tensor:
        return torch.tril(self.lower, -1) + torch.diag(self.log_diag.exp())

    def value(self, name: str, fixed: float | None) -> torch.Tensor:
        """``δ`` or ``σ²``: the fixed value exactly when one was given, else the parameter's."""
        if fixed is not None:
            return torch.tensor(fixed, dtype=torch.float64)
        return getattr(self, f"log_{name}").exp()

    def kl(self) -> torch.Tensor:
        """``½ (tr S - M - log|S|)``."""
        r = self.factor()
        return 0.5 * ((r * r).sum() - len(r) - 2.0 * self.log_diag.sum())


def _gaussian_energy(r2: torch.Tensor, var: torch.Tensor, sigma2: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """Per-point ``(1/α) log E_q[N(y; f, σ²)^α]`` for ``f ~ N(μ, var)``, ``r2 = (y - μ)²``."""
    if alpha == 0:
        return -0.5 * torch.log(2 * math.pi * sigma2) - (r2 + var) / (2 * sigma2)
    total = var + sigma2 / alpha
    return (-(alpha / 2) * torch.log(2 * math.pi * sigma2) + 0.5 * torch.log(sigma2 / alpha)
            - 0.5 * torch.log(2 * math.pi * total) - r2 / (2 * total)) / alpha


def _check_common(m, steps, lr, batch_size, alpha, fit_points, n_train: int,
                  prior_precision) -> float | None:
    """Check the settings both fits share; return ``prior_precision`` when it is held fixed."""
    for name, value in (("m", m), ("steps", steps), ("batch_size", batch_size),
                        ("fit_points", fit_points)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"VaLLA: {name} must be a positive integer, got {value!r}.")
    for name, value in (("lr", lr), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value) or value < 0 or (name == "lr" and value == 0):
            raise ConfigurationError(f"VaLLA: {name} must be a finite number "
                                     f"{'> 0' if name == 'lr' else '>= 0'}, got {value!r}.")
    if n_train < 1:
        raise ConfigurationError("VaLLA needs at least one training input.")
    delta_fixed = _check_positive("prior_precision", prior_precision)
    if alpha == 0 and delta_fixed is None:
        raise ConfigurationError(
            "VaLLA: with alpha = 0 (the ELBO) and the mean fixed to the network, the ELBO rises "
            "monotonically with the prior precision (for a softmax too: log softmax is "
            "concave), so it cannot be fitted; give prior_precision or use alpha > 0.")
    return delta_fixed


def _check_positive(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ConfigurationError(f"VaLLA: {name} must be a finite number > 0, got {value!r}.")
    return float(value)


def _adam(post: _Posterior, loss_fn, steps: int, lr: float, progress: bool,
          desc: str) -> list[float]:
    """Adam on the parameters that require grad; the loss of every step, as floats."""
    params = [p for p in post.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        opt.zero_grad()
        loss = loss_fn(step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if not all(math.isfinite(v) for v in losses[-10:]):
        raise NumericalError(f"VaLLA: the objective became non-finite ({losses[-1]}); lower lr.")
    return losses


def _subset(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.arange(n) if k >= n else torch.randperm(n, generator=gen)[:k].sort().values


def fit_valla(
    backbone: nn.Module,
    data: RegressionData,
    *,
    seed: int = 0,
    progress: bool = False,
    train: dict | None = None,
    m: int = 100,
    alpha: float = 1.0,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH,
    fit_points: int = FIT_POINTS,
    prior_precision: float | None = None,
    sigma2: float | None = None,
    init: str = "ggn",
) -> Fitted:
    """Fit VaLLA post hoc to the frozen single-output regressor ``backbone`` (see the module).

    ``init``: ``"ggn"`` starts ``S`` at the Gaussian optimum at the initial hyperparameters
    (see the module), ``"prior"`` at ``S = I`` (``q(u) = p(u)``).
    ``M = min(m, n_train)`` inducing inputs are drawn from the training inputs (seeded; the cap
    is recorded as ``info["m_used"]``). ``R``, ``δ`` and the noise ``σ²`` maximise the α-energy
    (``alpha``, default 1; 0 is the ELBO) by ``steps`` Adam steps of learning rate ``lr`` on
    mini-batches of ``batch_size`` of at most ``fit_points`` training inputs (all when fewer).
    ``prior_precision`` / ``sigma2``, when given, are held fixed at that value (``δ₀ = 1`` and
    ``σ₀²`` = the MAP's mean squared training residual otherwise). ``alpha = 0`` needs a fixed
    ``prior_precision`` (the ELBO with a fixed mean is maximised at ``δ → ∞``). The returned
    variance is the epistemic ``Σ(x)`` alone (the benchmark fits its own noise); the mean is
    ``backbone(x)`` itself. ``train`` is accepted for the common interface and unused.
    """
    del train
    n_train = len(data.x_train)
    delta_fixed = _check_common(m, steps, lr, batch_size, alpha, fit_points, n_train,
                                prior_precision)
    sigma2_fixed = _check_positive("sigma2", sigma2)
    if init not in ("ggn", "prior"):
        raise ConfigurationError(f"VaLLA: init must be 'ggn' or 'prior', got {init!r}.")
    lin = _Linearised(backbone)
    _check_single_output(lin, data.x_train, "VaLLA")
    if data.y_train.shape != (n_train, 1):
        raise ConfigurationError(f"VaLLA: y_train must be (N, 1), got {tuple(data.y_train.shape)}")

    gen = torch.Generator().manual_seed(seed)
    m_used = min(m, n_train)
    idx_z = torch.randperm(n_train, generator=gen)[:m_used]
    ind = _inducing(lin, data.x_train[idx_z], torch.zeros(m_used, dtype=torch.long), 1)
    idx_fit = _subset(n_train, fit_points, gen)
    x_fit = data.x_train[idx_fit]
    psi_parts, kres_parts = [], []
    for _, psi, kxx in _feature_chunks(lin, ind, x_fit, full=False, progress=progress):
        psi_parts.append(psi[:, 0])
        kres_parts.append((kxx[:, 0] - (psi[:, 0] ** 2).sum(-1)).clamp(min=0))
    psi, kres = torch.cat(psi_parts), torch.cat(kres_parts)
    with torch.no_grad():
        mean_fit = lin.model(x_fit.to(lin.device, lin.dtype))
    r2 = ((data.y_train[idx_fit].to(mean_fit.device).double() - mean_fit.double()) ** 2)
    r2 = r2.cpu().reshape(-1)
    if not (torch.isfinite(psi).all() and torch.isfinite(r2).all()):
        raise NumericalError("VaLLA: non-finite features or residuals on the training inputs.")

    n_fit = len(idx_fit)
    delta0 = 1.0 if delta_fixed is None else delta_fixed
    sigma20 = max(float(r2.mean()), 1e-6) if sigma2_fixed is None else sigma2_fixed
    eye = torch.eye(m_used, dtype=torch.float64)
    precision = eye + (n_train / n_fit) * (psi.T @ psi) / (delta0 * sigma20)
    s_init = (torch.cholesky_inverse(torch.linalg.cholesky(precision)) if init == "ggn" else eye)
    post = _Posterior(s_init, delta0, sigma20)
    post.log_delta.requires_grad_(delta_fixed is None)
    post.log_sigma2.requires_grad_(sigma2_fixed is None)
    batch = min(batch_size, n_fit)
    order = torch.Generator().manual_seed(seed + 1)

    def loss_fn(_step: int) -> torch.Tensor:
        b = (torch.arange(n_fit) if batch == n_fit else
             torch.randint(n_fit, (batch,), generator=order))
        proj = psi[b] @ post.factor()
        var = (kres[b] + (proj * proj).sum(-1)) / post.value("delta", delta_fixed)
        energy = _gaussian_energy(r2[b], var, post.value("sigma2", sigma2_fixed), alpha).sum()
        return -((n_train / batch) * energy - post.kl()) / n_train

    losses = _adam(post, loss_fn, steps, lr, progress, "VaLLA Adam")
    with torch.no_grad():
        factor = post.factor().detach()
        delta = float(post.value("delta", delta_fixed))
        noise = float(post.value("sigma2", sigma2_fixed))

    def predict(x: torch.Tensor) -> Moments:
        with torch.no_grad():
            mean = lin.model(x)
        parts = []
        for _, psi_x, kxx in _feature_chunks(lin, ind, x, full=False, progress=progress,
                                             desc="VaLLA predict"):
            p = psi_x[:, 0]
            proj = p @ factor
            parts.append(((kxx[:, 0] - (p * p).sum(-1)).clamp(min=0)
                          + (proj * proj).sum(-1)) / delta)
        var = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        return Moments(mean, var.to(mean.device, mean.dtype).reshape(mean.shape))

    info = {
        "m": m,
        "m_used": m_used,
        "inducing": "random training inputs, fixed",
        "alpha": float(alpha),
        "prior_precision": delta,
        "prior_precision_fitted": delta_fixed is None,
        "sigma2": noise,
        "sigma2_fitted": sigma2_fixed is None,
        "steps": steps,
        "lr": lr,
        "batch_size": batch,
        "fit_points": n_fit,
        "init": init,
        "jitter": ind.jitter,
        "objective_first": -losses[0],
        "objective_last": -sum(losses[-50:]) / len(losses[-50:]),
    }
    handle = {"lin": lin, "inducing": ind, "factor": factor, "delta": delta, "sigma2": noise}
    return Fitted(predict=predict, info=info, handle=handle)


# --------------------------------------------------------------------------- classification


def _check_classifier_labels(lin: _Linearised, backbone: nn.Module, data: ImageData) -> int:
    """ELLA's classifier check (:func:`gapa_bench.baselines.ella._check_classifier`) and
    ``y_train`` as ``(N,)`` class indices; the number of classes ``C``."""
    c = _check_classifier(lin, backbone, data, "VaLLA")
    if data.y_train.shape != (len(data.x_train),) or (
            len(data.y_train) and not (int(data.y_train.min()) >= 0 and int(data.y_train.max()) < c)):
        raise ConfigurationError(f"VaLLA: y_train must be (N,) class indices in [0, {c}).")
    return c


class VallaClassifier:
    """A fitted VaLLA classifier: the inducing rows, the whitened factor ``R`` and ``δ``; logit
    moments of any inputs in chunks (the mean of each chunk is the backbone's own logits)."""

    def __init__(self, lin: _Linearised, ind: _Inducing, factor: torch.Tensor, delta: float,
                 progress: bool = False):
        self.lin, self.inducing, self.factor, self.delta = lin, ind, factor, delta
        self.progress = progress

    def logit_moments(self, x: torch.Tensor) -> Moments:
        """Mean logits (the backbone's) and VaLLA logit variances ``diag Σ(x)``, ``(N, C)``."""
        parts = []
        for xb, psi, kxx in _feature_chunks(self.lin, self.inducing, x, full=False,
                                            progress=self.progress, desc="VaLLA logits"):
            with torch.no_grad():
                mean = self.lin.model(xb)
            proj = psi @ self.factor
            var = ((kxx - (psi * psi).sum(-1)).clamp(min=0) + (proj * proj).sum(-1)) / self.delta
            parts.append(Moments(mean, var.to(mean.device, mean.dtype)))
        return Moments.cat(parts)


def fit_valla_classifier(
    backbone: nn.Module,
    data: ImageData,
    *,
    seed: int = 0,
    progress: bool = False,
    train: dict | None = None,
    m: int = 100,
    alpha: float = 1.0,
    steps: int = CLASSIFIER_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH,
    fit_points: int = CLASSIFIER_FIT_POINTS,
    samples: int = MC_SAMPLES,
    prior_precision: float | None = None,
) -> Fitted:
    """Fit VaLLA post hoc to the frozen ``C``-class ``backbone`` (eval mode, logits ``(N, C)``).

    ``M = min(m, n_train)`` inducing (input, class) rows: random training inputs (seeded), row
    ``m`` taking class ``m mod C``. ``R`` and ``δ`` (held at ``prior_precision`` when given,
    ``δ₀ = 1`` otherwise) maximise the α-energy of the softmax likelihood, estimated with
    ``samples`` Monte Carlo draws per input, by ``steps`` Adam steps on mini-batches of at most
    ``fit_points`` training inputs. The prediction is the benchmark's for every method with
    logit moments (:func:`gapa_bench.baselines.scores.fit_logit_predictive`): the backbone's
    logits as mean, ``diag Σ(x)`` as variance, one variance scale fitted on validation NLL and
    the argmax-preserving predictive at that scale (so the predicted class is the network's);
    ``ood_scores`` holds the summed raw logit variance. ``Fitted.handle`` is the
    :class:`VallaClassifier`. ``train`` is accepted for the common interface and unused.
    """
    del train
    n_train = len(data.x_train)
    delta_fixed = _check_common(m, steps, lr, batch_size, alpha, fit_points, n_train,
                                prior_precision)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigurationError(f"VaLLA: samples must be a positive integer, got {samples!r}.")
    lin = _Linearised(backbone)
    c = _check_classifier_labels(lin, backbone, data)

    gen = torch.Generator().manual_seed(seed)
    m_used = min(m, n_train)
    idx_z = torch.randperm(n_train, generator=gen)[:m_used]
    ind = _inducing(lin, data.x_train[idx_z], torch.arange(m_used) % c, c)
    idx_fit = _subset(n_train, fit_points, gen)
    x_fit, y_fit = data.x_train[idx_fit], data.y_train[idx_fit].cpu()
    psi_parts, chol_parts, logit_parts = [], [], []
    eye_c = torch.eye(c, dtype=torch.float64)
    for xb, psi, kxx in _feature_chunks(lin, ind, x_fit, full=True, progress=progress):
        resid = kxx - psi @ psi.transpose(1, 2)
        resid = (resid + resid.transpose(1, 2)) / 2
        scale = kxx.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-300)[:, None, None]
        # the Nyström residual is PSD; clip the rounding below zero, then factor with jitter
        evals, evecs = torch.linalg.eigh(resid)
        resid = (evecs * evals.clamp(min=0)[:, None, :]) @ evecs.transpose(1, 2)
        chol_parts.append(torch.linalg.cholesky(resid + ind.jitter * scale * eye_c))
        psi_parts.append(psi)
        with torch.no_grad():
            logit_parts.append(lin.model(xb).double().cpu())
    psi, chol, logits = torch.cat(psi_parts), torch.cat(chol_parts), torch.cat(logit_parts)
    if not (torch.isfinite(psi).all() and torch.isfinite(logits).all()):
        raise NumericalError("VaLLA: non-finite features or logits on the training inputs.")

    n_fit = len(idx_fit)
    delta0 = 1.0 if delta_fixed is None else delta_fixed
    p = torch.softmax(logits, -1)
    # Σ_i Ψ_iᵀ (diag p_i - p_i p_iᵀ) Ψ_i, as a sum of PSD terms
    centred = (psi - torch.einsum("nc,ncm->nm", p, psi)[:, None, :]) * p.sqrt()[..., None]
    flat = centred.reshape(-1, m_used)
    precision = torch.eye(m_used, dtype=torch.float64) + (n_train / n_fit) * (
        flat.T @ flat) / delta0
    post = _Posterior(torch.cholesky_inverse(torch.linalg.cholesky(precision)), delta0, None)
    post.log_delta.requires_grad_(delta_fixed is None)
    batch = min(batch_size, n_fit)
    draws = torch.Generator().manual_seed(seed + 1)

    def loss_fn(_step: int) -> torch.Tensor:
        b = (torch.arange(n_fit) if batch == n_fit else
             torch.randint(n_fit, (batch,), generator=draws))
        eps1 = torch.randn(len(b), samples, c, generator=draws, dtype=torch.float64)
        eps2 = torch.randn(len(b), samples, m_used, generator=draws, dtype=torch.float64)
        proj = psi[b] @ post.factor()  # (b, C, M): Ψ R
        noise = (torch.einsum("bsd,bcd->bsc", eps1, chol[b])
                 + torch.einsum("bsm,bcm->bsc", eps2, proj))
        f = logits[b][:, None, :] + noise / post.value("delta", delta_fixed).sqrt()
        logp = torch.log_softmax(f, -1).gather(
            -1, y_fit[b][:, None, None].expand(-1, samples, 1))[..., 0]  # (b, S)
        if alpha == 0:
            energy = logp.mean(1)
        else:
            energy = (torch.logsumexp(alpha * logp, 1) - math.log(samples)) / alpha
        return -((n_train / len(b)) * energy.sum() - post.kl()) / n_train

    losses = _adam(post, loss_fn, steps, lr, progress, "VaLLA Adam")
    with torch.no_grad():
        factor = post.factor().detach()
        delta = float(post.value("delta", delta_fixed))
    handle = VallaClassifier(lin, ind, factor, delta, progress)
    info = {
        "m": m,
        "m_used": m_used,
        "inducing": "random training inputs, class m mod C, fixed",
        "alpha": float(alpha),
        "prior_precision": delta,
        "prior_precision_fitted": delta_fixed is None,
        "steps": steps,
        "lr": lr,
        "batch_size": batch,
        "fit_points": n_fit,
        "mc_samples": samples,
        "jitter": ind.jitter,
        "objective_first": -losses[0],
        "objective_last": -sum(losses[-50:]) / len(losses[-50:]),
    }
    return fit_logit_predictive(handle.logit_moments, data.x_val, data.y_val, info=info,
                                handle=handle)
