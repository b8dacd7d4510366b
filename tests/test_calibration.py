"""Tests for gapa.calibration.fit_scale_and_noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from gapa.calibration import Calibration, fit_scale_and_noise
from gapa.errors import InputError, NonFiniteError
from gapa.metrics import gaussian_nll


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
