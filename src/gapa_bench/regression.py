"""The regression pipeline shared by the demo and the benchmark: fit a method, calibrate it on
validation, score it on test.

Every method, GAPA included, goes through :func:`run_method`: the method returns its epistemic
variance, one scale and one homoscedastic noise are fitted on validation for all methods alike,
and the test metrics come from :mod:`gapa_bench.metrics`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from gapa.core import GAPA, LENGTHSCALE_FACTORS
from gapa.moments import Moments
from gapa.predictive.regression import fit_scale_and_noise

from .baselines import FitFn, Fitted
from .data import RegressionData
from .memory import peak_rss_mib, reset_peak_rss
from .metrics import regression_report
from .selection import select

#: The fields every JSON record has, in this order.
RECORD_FIELDS = ("dataset", "method", "seed", "nll", "crps", "cqm", "rmse", "fit_s", "test_s")


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
    dataset: str = ""
    split: str = ""  # how the data set was split (time-ordered, shuffled, file order, ...)
    seed: int = 0
    scale: float = 0.0  # validation-fitted multiplier of the method's variance
    noise: float = 0.0  # validation-fitted homoscedastic noise variance, standardised units
    val_nll: float = float("nan")  # mean validation NLL at that scale and noise (standardised)
    peak_rss_mib: float = 0.0  # peak resident memory of the process while the method ran
    info: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)  # commit, date, machine, command (provenance.run_info)
    fitted: Fitted | None = field(default=None, repr=False)

    def record(self) -> dict:
        """The JSON record: :data:`RECORD_FIELDS` plus calibration, memory, method info and
        provenance."""
        rec = {k: getattr(self, k) for k in RECORD_FIELDS}
        rec.update(split=self.split, scale=self.scale, noise=self.noise, val_nll=self.val_nll,
                   peak_rss_mib=self.peak_rss_mib, info=self.info, run=self.run)
        return rec


def fit_map(backbone: nn.Module, data: RegressionData, **_) -> Fitted:
    """The frozen network alone: zero epistemic variance, so calibration fits only the noise."""

    def predict(x: torch.Tensor) -> Moments:
        with torch.no_grad():
            mean = backbone(x)
        return Moments(mean, torch.zeros_like(mean))

    return Fitted(predict)


def fit_gapa(
    backbone: nn.Module, data: RegressionData, *, seed: int = 0, progress: bool = False,
    train: dict | None = None, lengthscale_factors=LENGTHSCALE_FACTORS, **options,
) -> Fitted:
    """GAPA on the training inputs; ``options`` go to :class:`gapa.GAPA`. The lengthscale factor
    is chosen on validation from ``lengthscale_factors`` by :meth:`gapa.GAPA.calibrate`, as a
    user would; the record says whether the choice was inside the candidates or at an end."""
    gm = GAPA(backbone, seed=seed, **options).fit(data.x_train, progress=progress)
    gm.calibrate(data.x_val, data.y_val, lengthscale_factors=lengthscale_factors)
    factors = sorted(lengthscale_factors or [])
    info = {"layers": gm.layers, "k": gm.config.k, "m": gm.config.m,
            "propagation": gm.propagation, "conditioning": gm.config.conditioning.value,
            "inducing": gm.config.inducing.value,
            "lengthscale_factor": gm.lengthscale_factor, "lengthscale_factors": factors,
            "lengthscale_factor_interior": bool(factors)
            and factors[0] < gm.lengthscale_factor < factors[-1]}
    return Fitted(gm, info=info, handle=gm)


def validation_nll(fitted: Fitted, data: RegressionData) -> float:
    """The mean validation NLL of ``fitted`` after the benchmark's common calibration (one
    variance scale and one noise fitted on validation): the criterion every method's settings
    are chosen by."""
    val = fitted.predict(data.x_val)
    return fit_scale_and_noise(val.mean, val.var, data.y_val).nll


def selected(fit: FitFn, candidates: dict[str, list], **fixed) -> FitFn:
    """``fit`` with its settings chosen on validation NLL from ``candidates``
    (:func:`gapa_bench.selection.select`); ``fixed`` settings are passed to every candidate.
    The choice, the candidates and every validation score land in ``info["selection"]``.

    The cost of choosing is the method's cost: a post-hoc method's fit call covers every
    candidate, and a method that trains networks reports every candidate's training time plus
    the validation passes as its ``fit_s``.
    """

    def fit_selected(backbone: nn.Module, data: RegressionData, **kw) -> Fitted:
        trained_s = []

        def one(setting: dict) -> tuple[float, Fitted]:
            t0 = time.perf_counter()
            fitted = fit(backbone, data, **kw, **fixed, **setting)
            score = validation_nll(fitted, data)
            if fitted.fit_s is not None:  # training time from the cache, plus this call
                trained_s.append(fitted.fit_s + time.perf_counter() - t0)
            return score, fitted

        fitted, selection = select(candidates, one)
        fitted.info["selection"] = selection.record()
        if trained_s:
            fitted.fit_s = sum(trained_s)
        return fitted

    return fit_selected


def run_method(
    name: str,
    fit: FitFn,
    backbone: nn.Module,
    data: RegressionData,
    *,
    seed: int = 0,
    progress: bool = False,
    train: dict | None = None,
) -> MethodResult:
    """Fit, calibrate on validation, predict on test, score in target units.

    ``fit_s`` covers the method's fit and the calibration (for methods that train networks, the
    recorded training seconds instead of the fit call); ``test_s`` one pass over the test inputs.
    """
    reset_peak_rss()
    t0 = time.perf_counter()
    fitted = fit(backbone, data, seed=seed, progress=progress, train=dict(train or {}))
    fit_call_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    val = fitted.predict(data.x_val)
    cal = fit_scale_and_noise(val.mean, val.var, data.y_val)
    calibrate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = fitted.predict(data.x_test)
    test_s = time.perf_counter() - t0
    fit_s = (fit_call_s if fitted.fit_s is None else fitted.fit_s) + calibrate_s
    mean, std = data.to_target_units(test.mean, cal.predictive_std(test.var))
    y = data.y_test * data.y_std + data.y_mean
    return MethodResult(
        name, **regression_report(mean, std, y), fit_s=fit_s, test_s=test_s, mean=mean, std=std,
        dataset=data.name, split=data.split, seed=seed, scale=cal.scale, noise=cal.noise,
        val_nll=cal.nll,
        peak_rss_mib=peak_rss_mib(),
        info=fitted.info, fitted=fitted,
    )


