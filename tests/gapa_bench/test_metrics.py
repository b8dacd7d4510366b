"""Tests for gapa_bench.metrics against scipy / properscoring and hand computations."""

from __future__ import annotations

import math

import numpy as np
import properscoring
import pytest
import torch
from scipy.stats import norm

from gapa.errors import InputError, NonFiniteError
from gapa_bench.metrics import (
    DEFAULT_ALPHAS,
    coverage,
    cqm,
    crps_gaussian,
    gaussian_nll,
    regression_report,
    rmse,
)


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(50, 3, generator=g, dtype=torch.float64)
    std = torch.rand(50, 3, generator=g, dtype=torch.float64) * 2 + 0.1
    y = mean + torch.randn(50, 3, generator=g, dtype=torch.float64) * 1.3
    return mean, std, y


def test_nll_matches_scipy(data):
    mean, std, y = data
    expected = -norm.logpdf(y.numpy(), loc=mean.numpy(), scale=std.numpy()).mean()
    assert gaussian_nll(mean, std, y) == pytest.approx(expected, rel=1e-12)


def test_nll_float32_computed_in_float64(data):
    mean, std, y = (t.float() for t in data)
    expected = -norm.logpdf(
        y.double().numpy(), loc=mean.double().numpy(), scale=std.double().numpy()
    ).mean()
    out = gaussian_nll(mean, std, y)
    assert isinstance(out, float)
    assert out == pytest.approx(expected, rel=1e-12)


def test_crps_matches_properscoring(data):
    mean, std, y = data
    expected = properscoring.crps_gaussian(y.numpy(), mu=mean.numpy(), sig=std.numpy()).mean()
    assert crps_gaussian(mean, std, y) == pytest.approx(expected, rel=1e-10)


def test_crps_at_the_mean_by_hand():
    # z = 0: CRPS = std * (2 phi(0) - 1/sqrt(pi)) = std * (sqrt(2) - 1) / sqrt(pi)
    std = torch.tensor([2.0])
    out = crps_gaussian(torch.zeros(1), std, torch.zeros(1))
    assert out == pytest.approx(2.0 * (math.sqrt(2) - 1) / math.sqrt(math.pi), rel=1e-14)


def test_rmse_by_hand():
    mean = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = torch.tensor([2.0, 2.0, 1.0, 4.0])  # errors 1, 0, -2, 0 -> mse 5/4
    assert rmse(mean, y) == pytest.approx(math.sqrt(5 / 4), rel=1e-15)


def test_cqm_three_point_hand_example():
    # |z| = 0.05, 1.0, 3.0. Quantiles Phi^-1(0.5 + a/2) for a = 0.1..0.9 are
    # 0.126, 0.253, 0.385, 0.524, 0.674, 0.842, 1.036, 1.282, 1.645, so 0.05 is always inside,
    # 1.0 is inside from a = 0.7 on and 3.0 never: c = 1/3 (x6), 2/3 (x3).
    # |c - a| in thirtieths: 7, 4, 1, 2, 5, 8, 1, 4, 7 -> sum 39/30 = 1.3 -> CQM = 0.13.
    mean = torch.zeros(3)
    std = torch.ones(3)
    y = torch.tensor([0.05, -1.0, 3.0])
    c = coverage(mean, std, y)
    assert c == pytest.approx([1 / 3] * 6 + [2 / 3] * 3, abs=1e-15)
    assert cqm(mean, std, y) == pytest.approx(0.13, abs=1e-14)


def test_cqm_well_calibrated_is_near_zero():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(200_000, generator=g, dtype=torch.float64)
    assert cqm(torch.zeros_like(y), torch.ones_like(y), y) < 0.005


def test_cqm_overconfident_approaches_half_sum_of_alphas():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(10_000, generator=g, dtype=torch.float64)
    out = cqm(torch.zeros_like(y), torch.full_like(y, 1e-9), y)
    assert out == pytest.approx(0.1 * sum(DEFAULT_ALPHAS), abs=1e-3)
    assert 0.1 * sum(DEFAULT_ALPHAS) == pytest.approx(0.45)


def test_cqm_custom_grid_uses_trapezoid_with_zero_ends():
    # One alpha at 0.5 with coverage 1: gap 0.5; trapezoid over (0, 0.5, 1) with values
    # (0, 0.5, 0) gives 0.25.
    mean, std, y = torch.zeros(4), torch.ones(4), torch.zeros(4)
    assert cqm(mean, std, y, alphas=[0.5]) == pytest.approx(0.25, abs=1e-15)


def test_coverage_accepts_closed_interval():
    mean, std = torch.zeros(2), torch.ones(2)
    y = torch.tensor([0.0, 5.0])
    assert coverage(mean, std, y, alphas=[1.0, 0.0]) == [1.0, 0.5]


def test_regression_report_keys_and_values(data):
    mean, std, y = data
    rep = regression_report(mean, std, y)
    assert set(rep) == {"nll", "crps", "cqm", "rmse"}
    assert all(isinstance(v, float) for v in rep.values())
    assert rep["nll"] == gaussian_nll(mean, std, y)
    assert rep["crps"] == crps_gaussian(mean, std, y)
    assert rep["cqm"] == cqm(mean, std, y)
    assert rep["rmse"] == rmse(mean, y)


@pytest.mark.parametrize("fn", [gaussian_nll, crps_gaussian, cqm, coverage])
def test_shape_mismatch_names_shapes(fn):
    with pytest.raises(InputError, match=r"shape mismatch.*std\(3, 1\)"):
        fn(torch.zeros(3), torch.ones(3, 1), torch.zeros(3))


def test_rmse_shape_mismatch():
    with pytest.raises(InputError, match=r"mean\(2,\), y\(2, 1\)"):
        rmse(torch.zeros(2), torch.zeros(2, 1))


@pytest.mark.parametrize("fn", [gaussian_nll, crps_gaussian, cqm, coverage, regression_report])
@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_std_raises(fn, bad):
    std = torch.tensor([1.0, bad, 1.0])
    with pytest.raises(InputError, match="std must be strictly positive"):
        fn(torch.zeros(3), std, torch.zeros(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["mean", "std", "y"])
def test_non_finite_raises(bad, which):
    args = {"mean": torch.zeros(3), "std": torch.ones(3), "y": torch.zeros(3)}
    args[which][1] = bad
    with pytest.raises(NonFiniteError, match=f"{which} has 1 non-finite"):
        gaussian_nll(**args)


def test_rmse_non_finite_raises():
    with pytest.raises(NonFiniteError, match="y has 1 non-finite"):
        rmse(torch.zeros(2), torch.tensor([0.0, float("nan")]))


def test_empty_raises():
    with pytest.raises(InputError, match="empty"):
        gaussian_nll(torch.zeros(0), torch.ones(0), torch.zeros(0))


def test_non_tensor_raises():
    with pytest.raises(InputError, match=r"must be a torch\.Tensor"):
        rmse(np.zeros(3), torch.zeros(3))


@pytest.mark.parametrize(
    ("alphas", "msg"),
    [([], "must not be empty"), ([0.0, 0.5], r"in \(0, 1\)"), ([0.5, 0.3], "strictly increasing")],
)
def test_cqm_bad_alphas(alphas, msg):
    with pytest.raises(InputError, match=msg):
        cqm(torch.zeros(3), torch.ones(3), torch.zeros(3), alphas=alphas)


def test_coverage_bad_alpha():
    with pytest.raises(InputError, match=r"in \[0, 1\]"):
        coverage(torch.zeros(3), torch.ones(3), torch.zeros(3), alphas=[1.5])
