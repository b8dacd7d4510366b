"""Tests for gapa.predictive.regression.fit_scale_and_noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from gapa.errors import InputError, NonFiniteError
from gapa.predictive.regression import (
    Calibration,
    _fit_scale_and_noise_reference,
    fit_scale_and_noise,
)
from gapa_bench.metrics import gaussian_nll


def _synthetic(scale: float, noise: float, n: int = 100_000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=g, dtype=torch.float64) * 3.0
    var = torch.rand(n, generator=g, dtype=torch.float64) ** 2 * 4.0 + 0.01
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    y = mean + (scale * var + noise).sqrt() * eps
    return mean, var, y


def _nll(cal_scale: float, cal_noise: float, mean, var, y) -> float:
    return gaussian_nll(mean, (cal_scale * var + cal_noise).sqrt(), y)


@pytest.mark.parametrize(("scale", "noise"), [(2.5, 0.3), (8.0, 0.5), (0.5, 1.0)])
def test_recovers_known_scale_and_noise(scale, noise):
    mean, var, y = _synthetic(scale, noise)
    cal = fit_scale_and_noise(mean, var, y)
    assert cal.scale == pytest.approx(scale, rel=0.05)
    assert cal.noise == pytest.approx(noise, rel=0.05)


def test_matches_a_generic_2d_optimiser():
    mean, var, y = _synthetic(0.2, 1.5, n=20_000, seed=1)  # weakly identified scale
    cal = fit_scale_and_noise(mean, var, y)
    r2, v = (y - mean).square().numpy(), var.numpy()

    def nll(p: np.ndarray) -> float:
        tot = np.exp(p[0]) * v + np.exp(p[1])
        return float(0.5 * np.mean(np.log(2 * np.pi * tot) + r2 / tot))

    res = minimize(nll, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14})
    assert cal.nll <= res.fun + 1e-10
    assert cal.scale == pytest.approx(np.exp(res.x[0]), rel=1e-4)
    assert cal.noise == pytest.approx(np.exp(res.x[1]), rel=1e-4)


def test_single_point():
    cal = fit_scale_and_noise(torch.zeros(1), torch.ones(1), torch.full((1,), 2.0))
    assert cal.scale * 1.0 + cal.noise == pytest.approx(4.0, rel=1e-4)


def test_reported_nll_matches_metric():
    mean, var, y = _synthetic(2.5, 0.3, n=20_000)
    cal = fit_scale_and_noise(mean, var, y)
    assert cal.nll == pytest.approx(gaussian_nll(mean, cal.predictive_std(var), y), rel=1e-12)


def test_optimum_not_worse_than_neighbours_or_noise_only():
    mean, var, y = _synthetic(1.7, 0.4, n=20_000, seed=3)
    cal = fit_scale_and_noise(mean, var, y)
    for ds in (0.98, 1.0, 1.02):
        for dn in (0.98, 1.0, 1.02):
            assert cal.nll <= _nll(cal.scale * ds, cal.noise * dn, mean, var, y) + 1e-10
    mse = float((y - mean).square().mean())
    assert cal.nll < _nll(0.0, mse, mean, var, y)


def test_uninformative_var_never_worse_than_noise_only():
    g = torch.Generator().manual_seed(4)
    mean = torch.zeros(5_000, dtype=torch.float64)
    var = torch.rand(5_000, generator=g, dtype=torch.float64)
    y = torch.randn(5_000, generator=g, dtype=torch.float64)  # var carries no information
    cal = fit_scale_and_noise(mean, var, y)
    mse = float(y.square().mean())
    assert cal.nll <= _nll(0.0, mse, mean, var, y) + 1e-12


def test_pure_scale_model_drives_noise_small():
    mean, var, y = _synthetic(3.0, 0.0, n=50_000, seed=5)
    cal = fit_scale_and_noise(mean, var, y)
    assert cal.scale == pytest.approx(3.0, rel=0.05)
    assert 0.0 < cal.noise < 0.01


def test_all_zero_var_gives_scale_zero_and_noise_mse_exactly():
    g = torch.Generator().manual_seed(6)
    mean = torch.randn(100, 2, generator=g)
    y = torch.randn(100, 2, generator=g)
    cal = fit_scale_and_noise(mean, torch.zeros_like(mean), y)
    mse = float((y.double() - mean.double()).square().mean())
    assert cal.scale == 0.0
    assert cal.noise == mse
    assert cal.nll == pytest.approx(_nll(0.0, mse, mean.double(), torch.zeros(100, 2), y.double()))


def test_fit_scale_false_keeps_scale_one():
    mean, var, y = _synthetic(1.0, 0.5, n=50_000, seed=7)
    cal = fit_scale_and_noise(mean, var, y, fit_scale=False)
    assert cal.scale == 1.0
    assert cal.noise == pytest.approx(0.5, rel=0.05)
    for dn in (0.98, 1.02):
        assert cal.nll <= _nll(1.0, cal.noise * dn, mean, var, y) + 1e-10


def test_fit_scale_false_with_zero_var_is_closed_form():
    mean = torch.zeros(4)
    y = torch.tensor([1.0, -1.0, 2.0, 0.0])
    cal = fit_scale_and_noise(mean, torch.zeros(4), y, fit_scale=False)
    assert cal.scale == 1.0
    assert cal.noise == pytest.approx(6 / 4, rel=1e-15)


def _assert_matches_reference(mean, var, y, *, fit_scale: bool = True, params: bool = True):
    """The fast fit is never worse than the slow nested reference and, where the optimum is well
    defined (``params``), lands on the same scale and noise."""
    new = fit_scale_and_noise(mean, var, y, fit_scale=fit_scale)
    ref = _fit_scale_and_noise_reference(mean, var, y, fit_scale=fit_scale)
    assert new.nll <= ref.nll + 1e-9 * abs(ref.nll)
    if params:
        assert new.scale == pytest.approx(ref.scale, rel=1e-5)
        assert new.noise == pytest.approx(ref.noise, rel=1e-5)
    return new, ref


def _tensors(*arrays: np.ndarray, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    return [torch.as_tensor(a, dtype=dtype) for a in arrays]


def test_matches_reference_heteroscedastic():
    _assert_matches_reference(*_synthetic(2.5, 0.3, n=20_000, seed=8))


def test_matches_reference_when_var_is_useless():
    # The residual spread shrinks where var grows, so scale -> 0 and the noise-only fit wins.
    g = np.random.default_rng(9)
    var = g.random(5_000)
    y = g.normal(size=5_000) * np.sqrt(2.0 - var)
    new, _ = _assert_matches_reference(*_tensors(np.zeros(5_000), var, y))
    assert new.scale == 0.0
    assert new.noise == float(np.mean(y**2))


def test_matches_reference_with_all_zero_var():
    y = np.random.default_rng(10).normal(size=300)
    new, ref = _assert_matches_reference(*_tensors(np.zeros(300), np.zeros(300), y))
    assert new == ref


def test_matches_reference_with_fixed_scale():
    _assert_matches_reference(*_synthetic(1.0, 0.5, n=20_000, seed=11), fit_scale=False)


@pytest.mark.parametrize("fit_scale", [True, False])
def test_matches_reference_with_huge_var_range(fit_scale):
    g = np.random.default_rng(12)
    var = 10.0 ** g.uniform(-8.0, 3.0, 20_000)
    y = g.normal(size=20_000) * np.sqrt(2.0 * var + 0.01)
    _assert_matches_reference(*_tensors(np.zeros(20_000), var, y), fit_scale=fit_scale)


@pytest.mark.parametrize(
    ("var", "y"),
    [([0.5, 2.0], [1.0, -3.0]), ([2.0, 0.5], [1.0, -3.0])],  # pure scale; noise only
)
def test_matches_reference_with_two_rows(var, y):
    mean, var_t, y_t = _tensors(np.zeros(2), var, y)
    new, _ = _assert_matches_reference(mean, var_t, y_t)
    assert new.noise >= 1e-6 * float(y_t.square().mean())


def test_matches_reference_with_float32_inputs():
    mean, var, y = (t.float() for t in _synthetic(3.0, 0.2, n=20_000, seed=13))
    _assert_matches_reference(mean, var, y)


@pytest.mark.parametrize("fit_scale", [True, False])
def test_matches_reference_with_heavy_tails(fit_scale):
    # Like flight delays: Student-t residuals and a few extreme ones.
    g = np.random.default_rng(14)
    mean = g.normal(size=20_000) * 10.0
    var = g.gamma(1.5, 20.0, 20_000)
    e = g.standard_t(2.5, 20_000)
    e[g.choice(20_000, 20, replace=False)] *= 40.0
    y = mean + np.sqrt(1.3 * var + 25.0) * e
    _assert_matches_reference(*_tensors(mean, var, y), fit_scale=fit_scale)


@pytest.mark.parametrize("seed", [105, 121, 134])
def test_matches_reference_when_scale_hits_its_upper_bound(seed):
    # Zero-var rows with tiny residuals pin the noise low; rows with var down to 1e-8 but unit
    # residuals ask for a scale beyond the box, so the optimum lies on its edge.
    g = np.random.default_rng(seed)
    var = np.where(np.arange(40) % 2 == 0, 0.0, 10.0 ** g.uniform(-8.0, 4.0, 40))
    y = g.standard_t(3.0, 40) * np.sqrt(np.where(var == 0, 1e-6, 1.0))
    new, _ = _assert_matches_reference(*_tensors(np.zeros(40), var, y))
    assert new.scale == pytest.approx(1e6 * np.mean(y**2) / np.mean(var), rel=1e-9)


@pytest.mark.parametrize("seed", [65, 177, 183, 229])
def test_matches_reference_with_two_basins(seed):
    # Two groups of rows whose var differs by ~1e5 make the NLL profile non-convex; a scan much
    # coarser than the groups' separation lands in the wrong basin on these seeds.
    g = np.random.default_rng(seed)
    var = np.where(np.arange(10) % 2 == 0, 1e-3, 1e2) * g.gamma(0.5, 1.0, 10)
    y = g.standard_t(3.0, 10) * np.sqrt(10 ** g.uniform(-2, 8) * var + 10 ** g.uniform(-6, 2))
    _assert_matches_reference(*_tensors(np.zeros(10), var, y))


def test_matches_reference_when_noise_hits_its_lower_bound():
    mean, var, y = _synthetic(0.5, 0.0, n=5_000, seed=15)  # var alone overexplains the residuals
    new, _ = _assert_matches_reference(mean, var, y, fit_scale=False)
    assert new.noise == pytest.approx(1e-6 * float((y - mean).square().mean()), rel=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_never_worse_than_reference_on_small_random_problems(seed):
    # Mixed variance regimes make the NLL non-convex; the reference's optimum is then not always
    # the global one, so only the NLL is compared.
    g = np.random.default_rng(100 + seed)
    n = 40
    var = np.where(g.random(n) < 0.5, 1e-3, 1e2) * g.gamma(0.5, 1.0, n)
    y = g.standard_t(3.0, n) * np.sqrt(g.uniform(0.1, 10.0) * var + g.uniform(1e-3, 10.0))
    _assert_matches_reference(*_tensors(np.zeros(n), var, y), fit_scale=seed % 3 != 0, params=False)


def test_predictive_std_keeps_dtype_and_never_sees_mean():
    cal = Calibration(scale=4.0, noise=9.0, nll=0.0)
    var = torch.tensor([0.0, 4.0], dtype=torch.float32)
    out = cal.predictive_std(var)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([3.0, 5.0]))
    assert torch.equal(cal.predictive_var(var), torch.tensor([9.0, 25.0]))


def test_calibration_is_frozen():
    cal = Calibration(scale=1.0, noise=1.0, nll=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cal.scale = 2.0  # type: ignore[misc]


def test_predictive_std_rejects_negative_and_nan():
    cal = Calibration(scale=1.0, noise=1.0, nll=0.0)
    with pytest.raises(InputError, match="non-negative"):
        cal.predictive_std(torch.tensor([-1.0]))
    with pytest.raises(NonFiniteError, match="non-finite"):
        cal.predictive_std(torch.tensor([float("nan")]))


def test_inputs_not_modified():
    mean, var, y = _synthetic(2.0, 0.1, n=1_000)
    copies = [t.clone() for t in (mean, var, y)]
    fit_scale_and_noise(mean, var, y)
    for a, b in zip((mean, var, y), copies, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("shapes", "pattern"),
    [
        (((3,), (3, 1), (3,)), r"var\(3, 1\)"),
        (((3,), (3,), (1, 3)), r"y\(1, 3\)"),
        (((2, 3), (3,), (2, 3)), r"mean\(2, 3\), var\(3,\)"),
    ],
)
def test_shape_mismatch(shapes, pattern):
    mean, var, y = (torch.ones(s) for s in shapes)
    with pytest.raises(InputError, match=r"shape mismatch.*" + pattern):
        fit_scale_and_noise(mean, var, y)


def test_negative_var_raises():
    with pytest.raises(InputError, match="var must be non-negative"):
        fit_scale_and_noise(torch.zeros(3), torch.tensor([1.0, -0.1, 1.0]), torch.ones(3))


@pytest.mark.parametrize("which", ["mean", "var", "y"])
def test_non_finite_raises(which):
    args = {"mean": torch.zeros(3), "var": torch.ones(3), "y": torch.ones(3)}
    args[which][0] = float("nan")
    with pytest.raises(NonFiniteError, match=f"{which} has 1 non-finite"):
        fit_scale_and_noise(**args)


def test_zero_residuals_raise():
    with pytest.raises(InputError, match="residuals"):
        fit_scale_and_noise(torch.ones(3), torch.ones(3), torch.ones(3))


def test_empty_raises():
    with pytest.raises(InputError, match="empty"):
        fit_scale_and_noise(torch.zeros(0), torch.zeros(0), torch.zeros(0))
