"""ELLA against the exact linearised Laplace approximation on a tiny float64 network."""

from __future__ import annotations

import itertools

import pytest
import torch

from gapa.errors import ConfigurationError
from gapa_bench.baselines.ella import (
    _features,
    _gram,
    _Linearised,
    _nystrom_directions,
    _posterior_covariance,
    _variance,
    exact_lla_variance,
    fit_ella,
)
from gapa_bench.data.regression import RegressionData
from helpers import jacobian_by_rows, mlp

N_TRAIN = 50
FEATURE_RTOL = 1e-12  # JVPs against products with full Jacobians: same sums, other order
SPAN_RTOL = 1e-8  # ELLA with the full Nyström span against exact LLA (float64 eigh, solves)
SIGMA2, DELTA = 0.01, 1.0  # fixed hyperparameters where the test compares approximations


def _data(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.nn.Module, object]:
    gen = torch.Generator().manual_seed(seed)
    net = mlp([2, 8, 8, 1]).to(dtype)  # 105 parameters > N_TRAIN: the Nyström span is a subspace

    def draw(n: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        x = scale * torch.randn(n, 2, generator=gen, dtype=dtype)
        with torch.no_grad():
            y = torch.sin(2 * x[:, :1]) + 0.1 * torch.randn(n, 1, generator=gen, dtype=dtype)
        return x, y

    (xt, yt), (xv, yv), (xs, ys) = draw(N_TRAIN), draw(30), draw(40, scale=2.0)
    data = RegressionData(
        name="toy",
        feature_names=["a", "b"],
        x_train=xt,
        y_train=yt,
        x_val=xv,
        y_val=yv,
        x_test=xs,
        y_test=ys,
        x_mean=torch.zeros(2),
        x_std=torch.ones(2),
        y_mean=0.0,
        y_std=1.0,
        split="random",
    )
    return net, data


def _ella_variance(net: torch.nn.Module, data, k: int, x: torch.Tensor) -> torch.Tensor:
    """ELLA with M = all training inputs, top-k eigenpairs, at the fixed (SIGMA2, DELTA)."""
    lin = _Linearised(net)
    directions, _ = _nystrom_directions(lin, data.x_train, k)
    cov = _posterior_covariance(_gram(_features(lin, directions, data.x_train)), SIGMA2, DELTA)
    return _variance(_features(lin, directions, x), cov).reshape(-1, 1)


def test_jvp_features_equal_full_jacobian_times_directions():
    net, data = _data()
    lin = _Linearised(net)
    directions, evals = _nystrom_directions(lin, data.x_train[:20], 5)
    x = torch.cat([data.x_train, data.x_test])
    expected = jacobian_by_rows(net, x) @ directions
    got = _features(lin, directions, x)
    assert got.shape == (len(x), 5)
    torch.testing.assert_close(got, expected, rtol=FEATURE_RTOL, atol=FEATURE_RTOL)
    # The directions are orthonormal in parameter space: VᵀV = Λ^{-1/2} Uᵀ K_MM U Λ^{-1/2} = I.
    torch.testing.assert_close(directions.T @ directions, torch.eye(5, dtype=torch.float64))
    assert (evals[:-1] >= evals[1:]).all()


def test_exact_reference_matches_function_space_form():
    net, data = _data()
    jac = jacobian_by_rows(net, data.x_train)
    jac_q = jacobian_by_rows(net, data.x_test)
    # GP view of LLA with prior N(0, I/δ): k_qq - k_qX (K_XX + σ² I)⁻¹ k_Xq, k = J Jᵀ / δ.
    k_xx = jac @ jac.T / DELTA
    k_qx = jac_q @ jac.T / DELTA
    k_qq = (jac_q**2).sum(1) / DELTA
    solve = torch.linalg.solve(k_xx + SIGMA2 * torch.eye(N_TRAIN, dtype=torch.float64), k_qx.T)
    expected = (k_qq - (k_qx * solve.T).sum(1)).reshape(-1, 1)
    got = exact_lla_variance(net, data.x_train, data.x_test, SIGMA2, DELTA)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_full_span_matches_exact_lla_at_training_inputs_and_bounds_it_elsewhere():
    net, data = _data()
    fitted = fit_ella(net, data, seed=0, progress=False, train={}, m=N_TRAIN, k=N_TRAIN)
    rank = int(torch.linalg.matrix_rank(jacobian_by_rows(net, data.x_train)))
    assert fitted.info["k_used"] == rank
    sigma2, delta = fitted.info["sigma2"], fitted.info["prior_precision"]

    train_var = fitted.predict(data.x_train).var
    exact_train = exact_lla_variance(net, data.x_train, data.x_train, sigma2, delta)
    torch.testing.assert_close(train_var, exact_train, rtol=SPAN_RTOL, atol=0)

    # With V spanning the row space of J_train (projector Q), the GGN Jᵀ J lives inside it and
    # A = JᵀJ/σ² + δI splits: A⁻¹ = V (VᵀAV)⁻¹ Vᵀ + (I - Q)/δ. ELLA keeps the first term, so
    #   exact(x) - ELLA(x) = ‖(I - Q) J(x)ᵀ‖² / δ ≥ 0,
    # the prior variance of the part of J(x) outside the span, which no training point informs.
    # It vanishes at the training inputs (checked above) and is positive elsewhere.
    test_var = fitted.predict(data.x_test).var
    exact_test = exact_lla_variance(net, data.x_train, data.x_test, sigma2, delta)
    assert (test_var <= exact_test * (1 + SPAN_RTOL)).all()
    _, s, vh = torch.linalg.svd(jacobian_by_rows(net, data.x_train), full_matrices=False)
    basis = vh[: int((s > s[0] * 1e-12).sum())]
    jac_q = jacobian_by_rows(net, data.x_test)
    outside = ((jac_q - jac_q @ basis.T @ basis) ** 2).sum(1, keepdim=True) / delta
    assert (outside > 0).all()
    # Both sides are differences of O(exact) numbers: compare with a floor relative to exact.
    assert ((exact_test - test_var - outside).abs() <= 1e-6 * outside + 1e-10 * exact_test).all()


def test_error_to_exact_lla_shrinks_as_k_grows():
    net, data = _data()
    x = torch.cat([data.x_train, data.x_test])
    exact = exact_lla_variance(net, data.x_train, x, SIGMA2, DELTA)
    # Top-k eigenvectors are nested, and ψᵀΣψ = max over w in span(V) of (J(x) w)² / (wᵀ A w),
    # so each point's ELLA variance can only grow with k, towards the exact value from below.
    gaps = [exact - _ella_variance(net, data, k, x) for k in (1, 2, 5, 10, 20, N_TRAIN)]
    for small, large in itertools.pairwise(gaps):
        assert (large <= small + 1e-10 * exact).all()
    assert (gaps[-1] >= -1e-10 * exact).all()
    assert gaps[-1].mean() < 0.5 * gaps[1].mean()  # K = full is much closer than K = 2


def test_mean_is_backbone_and_backbone_untouched():
    net, data = _data(torch.float32)
    net.train()  # a mode the caller chose must survive, as must requires_grad
    net[0].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    fitted = fit_ella(net, data, seed=3, progress=False, train={}, m=40, k=8)
    moments = fitted.predict(data.x_test)
    assert torch.equal(moments.mean, net(data.x_test))
    assert moments.var.shape == (len(data.x_test), 1)
    assert moments.var.dtype == torch.float32
    assert (moments.var >= 0).all()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [p.requires_grad for p in net.parameters()] == flags
    assert net.training
    assert set(fitted.info) == {"m", "k", "prior_precision", "prior_precision_grid",
                                "prior_precision_interior", "val_nll_span", "sigma2", "k_used"}
    assert fitted.info["m"] == 40 and fitted.info["k"] == 8
    low, high = fitted.info["prior_precision_grid"]
    assert fitted.info["prior_precision_interior"] == (low < fitted.info["prior_precision"] < high)
    assert fitted.info["val_nll_span"] >= 0


def test_seed_fixes_the_nystrom_points():
    net, data = _data()
    a = fit_ella(net, data, seed=1, progress=False, train={}, m=20, k=5)
    b = fit_ella(net, data, seed=1, progress=False, train={}, m=20, k=5)
    c = fit_ella(net, data, seed=2, progress=False, train={}, m=20, k=5)
    assert torch.equal(a.predict(data.x_test).var, b.predict(data.x_test).var)
    assert not torch.equal(a.predict(data.x_test).var, c.predict(data.x_test).var)


def test_default_sizes_are_capped_at_the_data():
    net, data = _data()
    fitted = fit_ella(net, data, seed=0, progress=False, train={})
    assert (fitted.info["m"], fitted.info["k"]) == (N_TRAIN, 20)  # defaults 2000, 20
    assert fit_ella(net, data, seed=0, progress=False, train={}, m=8).info["k"] == 8


@pytest.mark.parametrize(
    ("m", "k"),
    [(10, 11), (N_TRAIN + 1, 5), (N_TRAIN + 1, None), (10, 0), (0, 0), (10.0, 5), (True, 1)],
)
def test_bad_sizes_raise_configuration_error(m, k):
    net, data = _data()
    with pytest.raises(ConfigurationError):
        fit_ella(net, data, seed=0, progress=False, train={}, m=m, k=k)


def test_multi_output_raises_configuration_error():
    _, data = _data()
    net = mlp([2, 8, 2]).double()
    with pytest.raises(ConfigurationError, match="single-output"):
        fit_ella(net, data, seed=0, progress=False, train={}, m=10, k=2)
    with pytest.raises(ConfigurationError, match="single-output"):
        exact_lla_variance(net, data.x_train, data.x_test, SIGMA2, DELTA)
