"""Linearised Laplace (LLA) baselines through the reference library, laplace-torch 0.3.

Daxberger et al., "Laplace Redux - Effortless Bayesian Deep Learning", NeurIPS 2021. The
posterior over weights is Gaussian around the frozen MAP weights with precision
``GGN / σ² + diag(prior)``; the GLM (linearised) predictive then has mean ``f(x)`` (the network
itself) and epistemic function variance ``J(x) Σ J(x)ᵀ``. We run the library rather than our own
code so that the baselines are the ones its authors ship, in three flavours: all weights with a
diagonal or a Kronecker-factored (KFAC) GGN, and the last layer with the full GGN.

Hyperparameters come from the training set alone, as the library offers them: ``σ`` is the frozen
network's training RMSE (the maximum-likelihood noise), and the prior precision maximises the
Laplace evidence ``la.log_marginal_likelihood`` through the library's
``optimize_prior_precision(method="marglik")`` (Adam on its log, 300 steps from 1, converged on
a 160k-row problem). The prior is per parameter tensor (a weight and a bias are two "layers")
for the all-weights flavours and scalar for last-layer (whose class accepts only a scalar or a
per-parameter prior). We
do not also fit ``σ`` by the evidence, as the library's regression example does: for
``hessian_structure="kron"`` laplace-torch 0.3 multiplies the Kronecker eigenvalues by
``1/σ²`` through ``math.pow``, which turns the tensor into a float (torch only warns) and drops
the log-determinant's gradient with respect to ``σ`` (autograd 346 against finite differences 375
on a small network; diag agrees to 1e-9), and one rule for all three flavours keeps them
comparable. The benchmark refits a variance scale and the noise on validation anyway.
Everything is deterministic: ``seed`` is only recorded.

Curvature and Jacobians come from the BackPACK back end, the library's original one. The default
Curvlinops back end computes the diagonal GGN and the predictive's per-row Jacobians through
``torch.func.jacrev``, whose cost grows with the batch size squared (a minute for 8k rows where
BackPACK takes 0.3 s). The all-weights flavours run in the backbone's float32 (float64 gave the
same hyperparameters and variances to three digits at twice the predictive cost); last-layer runs
in float64, free at 201 parameters: its dense posterior precision is inverted by Cholesky, and in
float32 the variances of the tests' tiny network were off by up to 8e-5 relative (4e-8 in float64).
The mean is always the backbone's own output.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..data import RegressionData
from ..errors import MissingDependencyError
from ..moments import Moments
from . import Fitted

__all__ = ["fit_lla_diag", "fit_lla_kfac", "fit_lla_lastlayer"]

INSTALL_HINT = (
    "pip install --no-deps laplace-torch==0.3 backpack-for-pytorch==1.7.1 && pip install "
    "asdfghjkl==0.1a4 curvlinops-for-pytorch==3.0.1 einops unfoldNd einconv opt-einsum "
    "torchmetrics (with your torch pinned, as the Makefile does)"
)

FIT_BATCH = 512  #: rows per curvature batch
MARGLIK_STEPS = 300  #: Adam steps on the log marginal likelihood (the library's optimiser)
MARGLIK_LR = 0.1
#: Bound on rows x parameters per predictive batch: the library forms each row's full Jacobian
#: (and, for KFAC, its product with the posterior covariance), 2^25 floats = 128 MB at float32.
PREDICT_ELEMENTS = 1 << 25
PREDICT_MAX_ROWS = 4096

# BackPACK's backward hooks fire on a network whose input does not require gradients, and
# torch then warns that the full backward hook sees only the module outputs. The gradients
# BackPACK needs are with respect to the parameters, so the warning is benign here.
_BACKWARD_HOOK_WARNING = r"Full backward hook is firing when gradients are computed"


def _import_laplace() -> tuple[Any, Any]:
    """``(Laplace, BackPackGGN)``, or MissingDependencyError with how to install them."""
    try:
        with warnings.catch_warnings():
            # asdl (a laplace dependency) decorates functions with torch.jit.script at import.
            warnings.filterwarnings(
                "ignore", r"`torch\.jit\.script` is deprecated", DeprecationWarning
            )
            from laplace import Laplace
            from laplace.curvature import BackPackGGN
    except ImportError as err:
        raise MissingDependencyError(
            f"The Laplace baselines need laplace-torch 0.3 and BackPACK ({err}). Install them "
            f"without their torchvision dependency: {INSTALL_HINT}."
        ) from err
    return Laplace, BackPackGGN


class _BackpackWarnings(warnings.catch_warnings):
    """Silence BackPACK's benign full-backward-hook warning (see above), and only that."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.filterwarnings("ignore", _BACKWARD_HOOK_WARNING, UserWarning)


def _training_rmse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Root mean squared training residual of the frozen network (the MLE of ``σ``)."""
    sse = 0.0
    with torch.no_grad():
        for xb, yb in zip(x.split(PREDICT_MAX_ROWS), y.split(PREDICT_MAX_ROWS), strict=True):
            sse += float((model(xb) - yb).square().sum())
    return math.sqrt(max(sse / y.numel(), 1e-12))


def _rearm_backpack(model: nn.Module) -> None:
    """Let laplace re-register BackPACK's hooks on ``model`` at its next Jacobian call.

    BackPACK keeps every hook handle in one global context. laplace's ``jacobians`` removes them
    all when it finishes but marks only its own model as no longer extended, so another fitted
    model keeps the mark without its hooks and its next Jacobians fail (``grad_batch`` missing).
    Dropping all handles and clearing our model's marks before each call is what laplace does
    after it, so that any number of fitted Laplace baselines can predict in any order.
    """
    from backpack.context import CTX

    CTX.remove_hooks()
    for module in model.modules():
        if getattr(module, "_backpack_extend", False):
            module._backpack_extend = False


def _function_variance(la: Any, x: torch.Tensor, rows: int) -> torch.Tensor:
    """GLM predictive function variance ``diag(J Σ Jᵀ)`` as ``(N, outputs)``, in batches of
    ``rows``; laplace returns it without the noise ``σ²``."""
    out = []
    with _BackpackWarnings():
        for xb in x.split(rows):
            _rearm_backpack(la.model)
            _, f_var = la(xb, pred_type="glm")  # (rows, outputs, outputs)
            out.append(torch.diagonal(f_var, dim1=-2, dim2=-1))
    return torch.cat(out)


def _fit_laplace(
    backbone: nn.Module,
    data: RegressionData,
    *,
    subset: str,
    structure: str,
    prior_structure: str,
    seed: int,
    progress: bool,
    dtype: torch.dtype,
) -> Fitted:
    """Laplace over ``subset`` weights with a ``structure`` GGN in ``dtype``; ``σ`` is the
    training RMSE and the prior precision (``prior_structure``) maximises the evidence."""
    laplace_cls, backend = _import_laplace()
    device = next(backbone.parameters()).device
    model = copy.deepcopy(backbone).to(dtype).eval()  # laplace rewires what it fits: a copy
    for param in model.parameters():
        param.requires_grad_(True)  # laplace only treats parameters that require grad
    x_train, y_train = (t.to(device, dtype) for t in (data.x_train, data.y_train))
    sigma = _training_rmse(model, x_train, y_train)
    la = laplace_cls(
        model,
        "regression",
        subset_of_weights=subset,
        hessian_structure=structure,
        sigma_noise=sigma,
        backend=backend,
    )
    with _BackpackWarnings():
        la.fit(
            DataLoader(TensorDataset(x_train, y_train), batch_size=FIT_BATCH), progress_bar=progress
        )
    la.optimize_prior_precision(
        pred_type="glm",
        method="marglik",
        n_steps=MARGLIK_STEPS,
        lr=MARGLIK_LR,
        prior_structure=prior_structure,
        progress_bar=progress,
    )
    rows = max(1, min(PREDICT_MAX_ROWS, PREDICT_ELEMENTS // la.n_params))

    def predict(x: torch.Tensor) -> Moments:
        x = x.to(device)
        with torch.no_grad():
            mean = backbone(x)  # the frozen network, bit for bit (= laplace's GLM mean)
        var = _function_variance(la, x.to(dtype), rows)
        return Moments(mean, var.reshape(mean.shape).to(mean.dtype))

    prior = la.prior_precision.detach().cpu()
    with torch.no_grad():
        log_marglik = float(la.log_marginal_likelihood())
    return Fitted(
        predict,
        info={
            "subset_of_weights": subset,
            "hessian_structure": structure,
            "backend": backend.__name__,
            "prior_structure": prior_structure,
            "prior_precision": prior.item() if prior.numel() == 1 else prior.tolist(),
            "sigma_noise": sigma,
            "log_marglik": log_marglik,
            "n_params": int(la.n_params),
            "seed": seed,
        },
    )


def fit_lla_diag(
    backbone: nn.Module, data: RegressionData, *, seed: int, progress: bool, train: dict
) -> Fitted:
    """Linearised Laplace over all weights with a diagonal GGN (BackPACK's exact diagonal).

    Post hoc: ``train`` is unused and the benchmark times this call. Diagonal LLA is known to
    overstate the variance (the benchmark's validation scale absorbs the level, not the shape).
    """
    return _fit_laplace(
        backbone,
        data,
        subset="all",
        structure="diag",
        prior_structure="layerwise",
        seed=seed,
        progress=progress,
        dtype=torch.float32,
    )


def fit_lla_kfac(
    backbone: nn.Module, data: RegressionData, *, seed: int, progress: bool, train: dict
) -> Fitted:
    """Linearised Laplace over all weights with a Kronecker-factored GGN (BackPACK's KFLR, exact
    factors), one Kronecker block per weight and a dense block per bias.

    Post hoc: ``train`` is unused. The predictive is the costliest of the three: each row's
    Jacobian is rotated into the factors' eigenbases (about 3 ms a row for 3 x 200 on 2 cores).
    """
    return _fit_laplace(
        backbone,
        data,
        subset="all",
        structure="kron",
        prior_structure="layerwise",
        seed=seed,
        progress=progress,
        dtype=torch.float32,
    )


def fit_lla_lastlayer(
    backbone: nn.Module, data: RegressionData, *, seed: int, progress: bool, train: dict
) -> Fitted:
    """Linearised Laplace over the last layer's weights and bias with the full GGN, in float64.

    Post hoc: ``train`` is unused. The rest of the network is fixed, so the variance is that of
    Bayesian linear regression on the last hidden features.
    """
    return _fit_laplace(
        backbone,
        data,
        subset="last_layer",
        structure="full",
        prior_structure="scalar",
        seed=seed,
        progress=progress,
        dtype=torch.float64,  # the 201 x 201 posterior is cheap to invert in full precision
    )
