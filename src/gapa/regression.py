"""The regression pipeline shared by the demo and the benchmarks: fit, calibrate, score."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import fit_scale_and_noise
from .core import GAPA
from .data import RegressionData
from .metrics import regression_report


@dataclass
class MethodResult:
    """One method's test-set scores, in the target's own units, and its cost."""

    method: str
    nll: float
    crps: float
    cqm: float
    rmse: float
    fit_s: float
    test_s: float
    mean: torch.Tensor  # test predictive mean, target units
    std: torch.Tensor  # test predictive standard deviation, target units

    def record(self) -> dict:
        return {k: getattr(self, k) for k in ("method", "nll", "crps", "cqm", "rmse", "fit_s", "test_s")}


def _score(method: str, data: RegressionData, mean, std, fit_s: float, test_s: float) -> MethodResult:
    mean_u, std_u = data.to_target_units(mean, std)
    y_u = data.y_test * data.y_std + data.y_mean
    report = regression_report(mean_u, std_u, y_u)
    return MethodResult(method, **report, fit_s=fit_s, test_s=test_s, mean=mean_u, std=std_u)


def evaluate_map(model: nn.Module, data: RegressionData) -> MethodResult:
    """The frozen network with one homoscedastic noise fitted on validation (closed form)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        val_mean = model(data.x_val)
    cal = fit_scale_and_noise(val_mean, torch.zeros_like(val_mean), data.y_val)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        mean = model(data.x_test)
    std = cal.predictive_std(torch.zeros_like(mean))
    return _score("map", data, mean, std, fit_s, time.perf_counter() - t0)


def evaluate_gapa(
    model: nn.Module, data: RegressionData, *, method: str = "gapa", progress: bool = False, **options
) -> tuple[MethodResult, GAPA]:
    """Fit GAPA on the training inputs, calibrate on validation, score on test.

    ``fit_s`` covers caching, building the GPs and calibration; ``test_s`` one pass over the test
    inputs.
    """
    t0 = time.perf_counter()
    gm = GAPA(model, **options).fit(data.x_train, progress=progress)
    gm.calibrate(data.x_val, data.y_val)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = gm.predict(data.x_test)
    test_s = time.perf_counter() - t0
    return _score(method, data, pred.mean, pred.stddev, fit_s, test_s), gm
