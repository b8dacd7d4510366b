"""The Laplace baselines (laplace-torch) against hand-computed posteriors on a tiny network.

For a single-output network the per-row Jacobian of a Linear layer's weight is ``g ⊗ a`` (``a``
the layer's input, ``g = ∂f/∂(layer output)``) and of its bias ``g``. From these, in float64:
diagonal GGN, KFAC ``(Σ g gᵀ) ⊗ (Σ a aᵀ) / N`` with a separate bias block ``Σ g gᵀ``, and the
full last-layer GGN, each with laplace's fitted ``σ`` and prior precisions.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from torch import nn

from gapa import Moments
from gapa.errors import MissingDependencyError
from gapa_bench.backbones import mlp
from gapa_bench.baselines import laplace as lap
from gapa_bench.data import RegressionData, from_arrays

HAVE_LAPLACE = find_spec("laplace") is not None and find_spec("backpack") is not None
NO_LAPLACE = "laplace-torch / BackPACK not installed (make test installs them)"

METHODS = {
    "diag": lap.fit_lla_diag,
    "kfac": lap.fit_lla_kfac,
    "lastlayer": lap.fit_lla_lastlayer,
}
RTOL = 1e-4  # laplace in float32 (float64 for last-layer) against a float64 hand computation


@pytest.fixture(scope="module")
def data() -> RegressionData:
    rng = np.random.default_rng(0)
    x = rng.uniform(-2.0, 2.0, size=(120, 2))
    y = np.sin(2.0 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * rng.normal(size=120)
    return from_arrays(
        x, y, name="tiny", feature_names=["a", "b"], sizes=(80, 20, 20), split="random"
    )


@pytest.fixture(scope="module")
def backbone(data) -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp(data.n_features, width=16, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.mse_loss(model(data.x_train), data.y_train).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def fitted(backbone, data) -> dict:
    if not HAVE_LAPLACE:
        pytest.skip(NO_LAPLACE)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    out = {
        name: fit(backbone, data, seed=0, progress=False, train={}) for name, fit in METHODS.items()
    }
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "fit changed the backbone"
    return out


def _layer_io(model: nn.Sequential, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(a, g)`` per Linear layer in float64: its input and ``∂f/∂(its output)`` per row.

    Converts ``model`` to float64 in place: pass a copy."""
    model = model.double()
    h, ios = x.double(), []
    for module in model:
        if isinstance(module, nn.Linear):
            s = module(h)
            s.retain_grad()
            ios.append((h.detach(), s))
            h = s
        else:
            h = module(h)
    h.sum().backward()
    return [(a, s.grad) for a, s in ios]


def _kron_rows(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-row weight Jacobians ``g ⊗ a``, matching ``weight.flatten()`` (out-major)."""
    return torch.einsum("no,ni->noi", g, a).flatten(1)


def _quad(j: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Row-wise ``j P⁻¹ jᵀ``."""
    return (j * torch.linalg.solve(precision, j.T).T).sum(1)


def _hand_variance(method: str, backbone, data, info: dict, x: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(backbone)
    train, test = _layer_io(model, data.x_train), _layer_io(model, x)
    s2 = info["sigma_noise"] ** 2
    prior = info["prior_precision"]
    if method == "lastlayer":
        (a, _), (at, _) = train[-1], test[-1]
        j = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        jt = torch.cat([at, torch.ones(len(at), 1, dtype=at.dtype)], 1)
        return _quad(jt, j.T @ j / s2 + prior * torch.eye(j.shape[1], dtype=j.dtype))
    var = torch.zeros(len(x), dtype=torch.float64)
    for layer, ((a, g), (at, gt)) in enumerate(zip(train, test, strict=True)):
        lam_w, lam_b = prior[2 * layer], prior[2 * layer + 1]
        jw, jwt = _kron_rows(g, a), _kron_rows(gt, at)
        if method == "diag":
            var += (jwt**2 / ((jw**2).sum(0) / s2 + lam_w)).sum(1)
            var += (gt**2 / ((g**2).sum(0) / s2 + lam_b)).sum(1)
        else:
            gg, aa = g.T @ g, a.T @ a / len(a)
            eye_w = torch.eye(jw.shape[1], dtype=torch.float64)
            var += _quad(jwt, torch.kron(gg, aa) / s2 + lam_w * eye_w)
            var += _quad(gt, gg / s2 + lam_b * torch.eye(gg.shape[0], dtype=torch.float64))
    return var


@pytest.mark.parametrize("method", METHODS)
def test_moments_shape_mean_and_positive_var(method, fitted, backbone, data):
    out = fitted[method].predict(data.x_test)
    assert isinstance(out, Moments)
    assert out.mean.shape == out.var.shape == (len(data.x_test), 1)
    assert out.var.dtype == out.mean.dtype == torch.float32
    assert torch.isfinite(out.var).all() and (out.var > 0).all()
    with torch.no_grad():
        assert torch.equal(out.mean, backbone(data.x_test))


@pytest.mark.parametrize("method", METHODS)
def test_variance_matches_hand_computation(method, fitted, backbone, data):
    fit = fitted[method]
    var = fit.predict(data.x_test).var.reshape(-1).double()
    expected = _hand_variance(method, backbone, data, fit.info, data.x_test)
    torch.testing.assert_close(var, expected, rtol=RTOL, atol=0.0)


@pytest.mark.parametrize("method", METHODS)
def test_variance_grows_away_from_data(method, fitted, data):
    far = 10.0 * data.x_train.abs().max(0).values.reshape(1, -1)
    predict = fitted[method].predict
    assert predict(far).var.item() > predict(data.x_train).var.max().item()


@pytest.mark.parametrize("method", METHODS)
def test_info_records_hyperparameters(method, fitted, backbone, data):
    info = fitted[method].info
    with torch.no_grad():
        rmse = (backbone(data.x_train) - data.y_train).square().mean().sqrt().item()
    assert info["sigma_noise"] == pytest.approx(rmse, rel=1e-5)
    if method == "lastlayer":
        assert isinstance(info["prior_precision"], float)
        assert (info["subset_of_weights"], info["hessian_structure"]) == ("last_layer", "full")
    else:
        assert len(info["prior_precision"]) == len(list(backbone.parameters()))
        assert info["hessian_structure"] == {"diag": "diag", "kfac": "kron"}[method]
    assert all(p > 0 for p in np.atleast_1d(info["prior_precision"]))


def test_batched_prediction_equals_one_batch(fitted, backbone, data, monkeypatch):
    monkeypatch.setattr(lap, "PREDICT_ELEMENTS", 7 * 337)  # 7 rows per batch for 337 params
    small = lap.fit_lla_kfac(backbone, data, seed=0, progress=False, train={})
    x = torch.cat([data.x_val, data.x_test])
    torch.testing.assert_close(small.predict(x).var, fitted["kfac"].predict(x).var)


def test_fitted_models_predict_in_any_order(fitted, data):
    """BackPACK's hooks live in one global context; every fitted model must survive the others'
    predictions (a bare laplace-torch 0.3 fails the second model with missing ``grad_batch``)."""
    x = data.x_val
    first = {name: fitted[name].predict(x).var for name in ("diag", "kfac", "lastlayer")}
    for name in ("kfac", "diag", "lastlayer", "diag"):
        torch.testing.assert_close(fitted[name].predict(x).var, first[name])


def test_caller_backbone_is_not_extended(fitted, backbone):
    """BackPACK hooks go on laplace's copy only; the caller's modules keep no hooks."""
    for module in backbone.modules():
        assert not module._forward_hooks and not module._backward_hooks
    assert all(p.grad is None for p in backbone.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_missing_laplace_raises(method, backbone, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "laplace", None)
    with pytest.raises(MissingDependencyError, match="laplace-torch"):
        METHODS[method](backbone, data, seed=0, progress=False, train={})


@pytest.mark.skipif(not HAVE_LAPLACE, reason=NO_LAPLACE)
def test_first_import_raises_no_warning():
    """laplace's import warns (asdl's torch.jit.script); the wrapper filters just that one."""
    code = "from gapa_bench.baselines.laplace import _import_laplace; _import_laplace()"
    run = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
