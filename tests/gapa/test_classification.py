"""Tests for gapa.predictive.classification: probit variants, Monte Carlo, Laplace bridge, fits, errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from gapa.errors import ConfigurationError, InputError, NonFiniteError
from gapa.moments import Moments
from gapa.predictive.classification import (
    ClassPrediction,
    LaplaceBridge,
    Method,
    OODScore,
    fit_temperature,
    fit_variance_scale,
    laplace_bridge,
    monte_carlo,
    predict_classes,
    probit,
    probit_argmax_preserving,
)

F64 = torch.float64

#: Tolerances of this module (float64 unless stated), in probability units unless stated.
TOL = {
    # argmax-preserving probit vs Monte Carlo (20k samples), max abs error over 100 x 5 inputs
    "probit_vs_mc_small": 0.01,  # var <= 0.1 (measured 0.006 on 500 inputs)
    "probit_vs_mc_moderate": 0.04,  # var <= 0.5 (measured 0.023 on 500 inputs)
    "per_class_probit_vs_mc_small": 0.02,  # var <= 0.1 (measured 0.011)
    "mc_standard_errors": 4.0,  # MC vs quadrature, in standard errors
    "bridge_vs_mc": 4e-3,  # Dirichlet-consistent, alpha >= 30 (measured 1.2e-3)
    "roundtrip_rel": 1e-12,  # Dirichlet -> Gaussian -> Dirichlet, relative
    "sum_to_one": 1e-14,
    "scale_rel": 0.1,  # fit_variance_scale on 20k synthetic labels (measured <= 0.04)
    "temperature_rel": 0.05,  # fit_temperature on 20k synthetic labels (measured <= 0.012)
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(n: int, c: int, seed: int, spread: float = 2.0, dtype=F64) -> torch.Tensor:
    return (spread * torch.randn(n, c, generator=_gen(seed), dtype=F64)).to(dtype)


def _hetero_var(n: int, c: int, seed: int, scale: float = 1.0, dtype=F64) -> torch.Tensor:
    """Log-normal variances spanning about two orders of magnitude within each row."""
    return (scale * torch.exp(1.5 * torch.randn(n, c, generator=_gen(seed), dtype=F64))).to(dtype)


def _dirichlet_gaussian(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Laplace approximation of Dir(alpha) in the softmax basis: zero-sum mean, diag covariance."""
    log_a = alpha.log()
    k = alpha.shape[-1]
    mu = log_a - log_a.mean(-1, keepdim=True)
    var = (1 - 2 / k) / alpha + (1 / alpha).sum(-1, keepdim=True) / k**2
    return mu, var


# --------------------------------------------------------------------------- zero variance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_variance_is_softmax_bit_for_bit(dtype):
    mu = _logits(500, 7, seed=0, dtype=dtype)
    zero = torch.zeros_like(mu)
    ref = torch.softmax(mu, dim=-1)
    assert torch.equal(probit(mu, zero), ref)
    assert torch.equal(probit_argmax_preserving(mu, zero), ref)
    assert torch.equal(predict_classes(Moments(mu, zero)).probs, ref)
    mc = monte_carlo(mu, zero, n_samples=8)
    torch.testing.assert_close(mc, ref, rtol=0, atol=1e-15 if dtype == F64 else 1e-7)


# --------------------------------------------------------------------------- vs Monte Carlo


@pytest.mark.parametrize(
    ("var_max", "tol"),
    [(0.1, TOL["probit_vs_mc_small"]), (0.5, TOL["probit_vs_mc_moderate"])],
)
def test_argmax_preserving_probit_matches_monte_carlo(var_max, tol):
    mu = _logits(100, 5, seed=1)
    var = var_max * torch.rand(100, 5, generator=_gen(2), dtype=F64)
    ref = monte_carlo(mu, var, 20_000, _gen(3))
    approx = probit_argmax_preserving(mu, var)
    assert (approx - ref).abs().max() <= tol
    # and it moves the plain softmax towards Monte Carlo, not away from it
    plain = torch.softmax(mu, dim=-1)
    assert (approx - ref).abs().mean() < 0.7 * (plain - ref).abs().mean()


def test_per_class_probit_matches_monte_carlo_for_small_variance():
    mu = _logits(100, 5, seed=4)
    var = 0.1 * torch.rand(100, 5, generator=_gen(5), dtype=F64)
    ref = monte_carlo(mu, var, 20_000, _gen(6))
    assert (probit(mu, var) - ref).abs().max() <= TOL["per_class_probit_vs_mc_small"]


def test_monte_carlo_matches_quadrature_for_two_classes():
    # With two classes softmax is sigmoid(f1 - f0), f1 - f0 ~ N(m1 - m0, v0 + v1): a 1-D integral.
    mu = torch.tensor([[0.3, 1.1], [-2.0, 0.5], [0.0, 0.0], [4.0, -1.0]], dtype=F64)
    var = torch.tensor([[0.5, 1.0], [3.0, 0.2], [2.0, 2.0], [0.1, 6.0]], dtype=F64)
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)
    d_mean = (mu[:, 1] - mu[:, 0]).numpy()[:, None]
    d_std = np.sqrt((var[:, 0] + var[:, 1]).numpy())[:, None]
    p1 = (weights / np.sqrt(2 * np.pi) / (1 + np.exp(-(d_mean + d_std * nodes)))).sum(1)
    n = 40_000
    mc = monte_carlo(mu, var, n, _gen(7), max_elements=10_000)  # many chunks
    se = 0.5 / math.sqrt(n)
    assert np.abs(mc[:, 1].numpy() - p1).max() <= TOL["mc_standard_errors"] * se
    torch.testing.assert_close(mc.sum(-1), torch.ones(4, dtype=F64), rtol=0, atol=1e-14)


def test_monte_carlo_is_seeded_and_leaves_global_rng_alone():
    mu, var = _logits(20, 4, seed=8), _hetero_var(20, 4, seed=9)
    state = torch.random.get_rng_state()
    a = monte_carlo(mu, var, 500, _gen(10))
    b = monte_carlo(mu, var, 500, _gen(10))
    assert torch.equal(a, b)
    assert torch.equal(monte_carlo(mu, var, 500), monte_carlo(mu, var, 500))  # default seed 0
    assert not torch.equal(a, monte_carlo(mu, var, 500, _gen(11)))
    assert torch.equal(torch.random.get_rng_state(), state)


# --------------------------------------------------------------------------- argmax


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e8, 1e30])
def test_default_preserves_argmax_exactly(dtype, scale):
    n, c = 5000, 10
    mu = _logits(n, c, seed=12, dtype=dtype)
    # ties at the top: duplicate the max into a later and an earlier column for some rows
    top = mu.argmax(-1)
    rows = torch.arange(0, n, 7)
    mu[rows, (top[rows] + 3) % c] = mu[rows, top[rows]]
    mu[n - 5 :] = 0.25  # rows with every class tied
    var = _hetero_var(n, c, seed=13, scale=scale, dtype=dtype)
    probs = probit_argmax_preserving(mu, var)
    assert torch.equal(probs.argmax(-1), mu.argmax(-1))
    tied = mu == mu.amax(-1, keepdim=True)
    top_p = probs.gather(-1, mu.argmax(-1, keepdim=True)).expand_as(probs)
    assert torch.equal(probs[tied], top_p[tied])  # tied logits get identical probabilities
    pred = predict_classes(Moments(mu, var))
    assert torch.equal(pred.predicted, mu.argmax(-1))
    assert torch.equal(pred.predicted, pred.probs.argmax(-1))  # the field is the probs' argmax


def test_per_class_probit_can_change_the_argmax():
    # A confident-but-uncertain winner loses to a certain runner-up under the per-class probit.
    mu = torch.tensor([[1.0, 0.9, -1.0]], dtype=F64)
    var = torch.tensor([[100.0, 0.0, 0.0]], dtype=F64)
    assert probit(mu, var).argmax(-1).item() == 1
    assert probit_argmax_preserving(mu, var).argmax(-1).item() == 0
    # and it does so on the random inputs of the test above, so that test can fail
    mu = _logits(5000, 10, seed=12)
    var = _hetero_var(5000, 10, seed=13, scale=1e3)
    assert int((probit(mu, var).argmax(-1) != mu.argmax(-1)).sum()) > 100


def test_argmax_guard_handles_rounding_ties():
    # Two logits one ulp apart: with a huge variance every probability rounds to 1/3, and an
    # unguarded softmax would return class 0.
    mu = torch.tensor([[1.0, math.nextafter(1.0, 2.0), 0.5]], dtype=F64)
    var = torch.full_like(mu, 1e20)
    kappa_scaled = torch.softmax(mu / torch.sqrt(1 + math.pi / 8 * var.mean(-1, keepdim=True)), -1)
    assert kappa_scaled.argmax(-1).item() == 0  # what the guard is for
    probs = probit_argmax_preserving(mu, var)
    assert probs.argmax(-1).item() == 1
    # the guard moves the offending entry one ulp below the top and touches nothing else
    assert probs[0, 0] == math.nextafter(kappa_scaled[0, 1].item(), 0.0)
    assert torch.equal(probs[0, 1:], kappa_scaled[0, 1:])
    # the same happens at ordinary variances in float32 on random inputs
    mu32 = _logits(5000, 10, seed=14, dtype=torch.float32)
    var32 = torch.full_like(mu32, 1e12)
    raw = torch.softmax(mu32 / torch.sqrt(1 + math.pi / 8 * var32.mean(-1, keepdim=True)), -1)
    assert int((raw.argmax(-1) != mu32.argmax(-1)).sum()) > 0
    assert torch.equal(probit_argmax_preserving(mu32, var32).argmax(-1), mu32.argmax(-1))


# --------------------------------------------------------------------------- offsets, monotonicity


def test_offset_invariance():
    mu, var = _logits(50, 4, seed=15), _hetero_var(50, 4, seed=16)
    shifted = mu + 3.0
    torch.testing.assert_close(
        probit_argmax_preserving(shifted, var), probit_argmax_preserving(mu, var)
    )
    torch.testing.assert_close(
        monte_carlo(shifted, var, 200, _gen(17)), monte_carlo(mu, var, 200, _gen(17))
    )
    torch.testing.assert_close(
        laplace_bridge(shifted, var).concentration, laplace_bridge(mu, var).concentration
    )
    # The per-class probit, and the corrected bridge with unequal variances, are not invariant.
    assert (probit(shifted, var) - probit(mu, var)).abs().max() > 0.05
    a = laplace_bridge(shifted, var, correct=True).probs
    assert (a - laplace_bridge(mu, var, correct=True).probs).abs().max() > 0.01


def test_entropy_and_ood_score_are_monotone_in_variance():
    mu, var = _logits(200, 6, seed=18), _hetero_var(200, 6, seed=19)
    scales = [0.0, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e4]
    preds = [predict_classes(Moments(mu, var), variance_scale=s) for s in scales]
    ent = torch.stack([p.predictive_entropy for p in preds])
    assert torch.equal(torch.stack([p.ood_score for p in preds]), ent)  # entropy is the default
    assert bool((ent.diff(dim=0) > 0).all())
    assert bool((ent[-1] <= math.log(6) + 1e-12).all())
    tv = torch.stack([p.total_logit_variance for p in preds])
    assert bool((tv == var.sum(-1)).all())  # raw: the scale leaves the variance score alone
    conf = torch.stack(
        [
            predict_classes(Moments(mu, var), ood_score="max_prob", variance_scale=s).ood_score
            for s in scales
        ]
    )
    assert bool((conf.diff(dim=0) > 0).all())


def test_per_class_probit_entropy_is_not_monotone():
    # Shrinking an uncertain, negative logit towards 0 can make the predictive *more* confident.
    mu = torch.tensor([[-1.0, -1.5]], dtype=F64)
    h = [
        predict_classes(
            Moments(mu, torch.tensor([[0.0, v]], dtype=F64)), "probit"
        ).predictive_entropy.item()
        for v in (0.0, 1e4)
    ]
    assert h[1] < h[0] - 0.05


# --------------------------------------------------------------------------- Laplace bridge


def test_laplace_bridge_inverts_the_dirichlet_laplace_approximation():
    alpha = torch.tensor([[200.0, 100.0, 50.0, 150.0], [0.7, 3.0, 12.0, 1.5]], dtype=F64)
    mu, var = _dirichlet_gaussian(alpha)
    bridge = laplace_bridge(mu, var)
    assert isinstance(bridge, LaplaceBridge)
    torch.testing.assert_close(bridge.concentration, alpha, rtol=TOL["roundtrip_rel"], atol=0)
    torch.testing.assert_close(bridge.probs, alpha / alpha.sum(-1, keepdim=True))
    torch.testing.assert_close(bridge.precision, alpha.sum(-1))


def test_laplace_bridge_matches_monte_carlo_mean_for_small_variance():
    alpha = torch.tensor(
        [[200.0, 100.0, 50.0, 150.0], [30.0, 30.0, 40.0, 60.0], [1000.0, 10.0, 10.0, 10.0]],
        dtype=F64,
    )
    mu, var = _dirichlet_gaussian(alpha)  # variances 1e-3 .. 1e-1
    ref = monte_carlo(mu, var, 100_000, _gen(20))
    assert (laplace_bridge(mu, var).probs - ref).abs().max() <= TOL["bridge_vs_mc"]


def test_laplace_bridge_limits():
    k = 5
    g = _gen(21)
    mu, var = torch.randn(30, k, generator=g, dtype=F64), _hetero_var(30, k, seed=22)
    b = laplace_bridge(mu, var)
    torch.testing.assert_close(
        b.probs.sum(-1), torch.ones(30, dtype=F64), rtol=0, atol=TOL["sum_to_one"]
    )
    assert bool((b.concentration > 0).all())
    # equal logits and variances: uniform mean, alpha_k = (1 - 1/K) / v; corrected: 1 / v
    flat, v = torch.full((1, k), 0.3, dtype=F64), torch.full((1, k), 0.2, dtype=F64)
    torch.testing.assert_close(laplace_bridge(flat, v).probs, torch.full((1, k), 1 / k, dtype=F64))
    torch.testing.assert_close(laplace_bridge(flat, v).concentration, (1 - 1 / k) / v)
    torch.testing.assert_close(laplace_bridge(flat, v, correct=True).concentration, 1 / v)
    # scaling every variance divides alpha and keeps the mean; precision falls as var grows
    for c in (1e-4, 0.1, 10.0, 1e4):
        bc = laplace_bridge(mu, c * var)
        torch.testing.assert_close(bc.concentration, b.concentration / c)
        torch.testing.assert_close(bc.probs, b.probs)
    # a dominant logit concentrates the mass on its class, without overflow in the mean
    for gap in (20.0, 2000.0):
        mu_gap = torch.tensor([[gap, 0.0, 0.0, 0.0, 0.0]], dtype=F64)
        p = laplace_bridge(mu_gap, torch.full_like(mu_gap, 0.5)).probs
        assert bool(torch.isfinite(p).all()) and p[0, 0] > 0.999
    # two classes: no (1 - 2/K) term; the equations still hold
    mu2, var2 = _dirichlet_gaussian(torch.tensor([[4.0, 9.0]], dtype=F64))
    torch.testing.assert_close(
        laplace_bridge(mu2, var2).concentration, torch.tensor([[4.0, 9.0]], dtype=F64)
    )


def test_laplace_bridge_rejects_zero_variance():
    mu = torch.zeros(2, 3, dtype=F64)
    var = torch.ones(2, 3, dtype=F64)
    var[1, 2] = 0.0
    with pytest.raises(InputError, match="var > 0"):
        laplace_bridge(mu, var)


# --------------------------------------------------------------------------- front door


@pytest.mark.parametrize("method", list(Method))
def test_predict_classes_fields(method):
    mu, var = _logits(40, 5, seed=23), _hetero_var(40, 5, seed=24)
    pred = predict_classes(Moments(mu, var), method.value, variance_scale=2.0, n_samples=200)
    assert isinstance(pred, ClassPrediction)
    assert pred.method is method and pred.ood_score_kind is OODScore.ENTROPY
    assert pred.probs.shape == (40, 5)
    for field in (
        "predicted",
        "predictive_entropy",
        "total_logit_variance",
        "predicted_logit_variance",
        "ood_score",
    ):
        assert getattr(pred, field).shape == (40,)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(40, dtype=F64))
    assert torch.equal(pred.predicted, pred.probs.argmax(-1))
    # raw variances: the scale changes no ranking and a scale of 0 must not erase them
    torch.testing.assert_close(pred.total_logit_variance, var.sum(-1))
    torch.testing.assert_close(
        pred.predicted_logit_variance, var.gather(-1, pred.predicted[:, None])[:, 0]
    )
    if method is not Method.LAPLACE_BRIDGE:  # the bridge refuses var = 0
        zero = predict_classes(Moments(mu, var), method.value, variance_scale=0.0,
                               n_samples=200, ood_score="total_variance")
        torch.testing.assert_close(zero.ood_score, var.sum(-1))
    p = pred.probs
    torch.testing.assert_close(pred.predictive_entropy, -(p * p.log()).sum(-1))
    assert (pred.concentration is not None) == (method is Method.LAPLACE_BRIDGE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pred.probs = p  # type: ignore[misc]


def test_predict_classes_ood_scores_and_batch_shapes():
    mu, var = _logits(24, 4, seed=25).reshape(2, 3, 4, 4), _hetero_var(24, 4, seed=26)
    var = var.reshape(2, 3, 4, 4)
    m = Moments(mu, var)
    base = predict_classes(m)
    assert base.predicted.shape == (2, 3, 4)
    assert torch.equal(predict_classes(m, ood_score="total_variance").ood_score, var.sum(-1))
    assert torch.equal(
        predict_classes(m, ood_score=OODScore.PREDICTED_VARIANCE).ood_score,
        base.predicted_logit_variance,
    )
    torch.testing.assert_close(
        predict_classes(m, ood_score="max_prob").ood_score, 1 - base.probs.amax(-1)
    )


# --------------------------------------------------------------------------- fits


@pytest.mark.parametrize(
    ("scale", "method"),
    [(3.0, "argmax_preserving"), (20.0, "argmax_preserving"), (3.0, "probit")],
)
def test_fit_variance_scale_recovers_a_known_scale(scale, method):
    n, c = 20_000, 5
    mu, var = (
        _logits(n, c, seed=27, spread=2.5),
        torch.exp(torch.randn(n, c, generator=_gen(28), dtype=F64)),
    )
    predictive = probit_argmax_preserving if method == "argmax_preserving" else probit
    labels = torch.multinomial(predictive(mu, scale * var), 1, generator=_gen(29))[:, 0]
    fit = fit_variance_scale(mu, var, labels, method=method)
    assert fit.scale == pytest.approx(scale, rel=TOL["scale_rel"])
    assert fit.method is Method(method)
    assert fit.nll < fit.map_nll
    # the fitted scale keeps every predicted class with the default predictive
    pred = predict_classes(Moments(mu, var), variance_scale=fit.scale)
    assert torch.equal(pred.predicted, mu.argmax(-1))


def test_fit_variance_scale_without_variance_returns_zero():
    mu = _logits(300, 3, seed=30)
    labels = torch.randint(0, 3, (300,), generator=_gen(31))
    fit = fit_variance_scale(mu, torch.zeros_like(mu), labels)
    assert fit.scale == 0.0 and fit.nll == fit.map_nll


def test_fit_variance_scale_prefers_zero_when_variance_only_hurts():
    # Labels always equal the argmax: any variance lowers the likelihood of the right class.
    mu, var = _logits(500, 4, seed=32), _hetero_var(500, 4, seed=33)
    fit = fit_variance_scale(mu, var, mu.argmax(-1))
    assert fit.scale == 0.0


@pytest.mark.parametrize("method", ["monte_carlo", "laplace_bridge", "nope"])
def test_fit_variance_scale_rejects_other_methods(method):
    mu = _logits(10, 3, seed=34)
    with pytest.raises(ConfigurationError, match="method"):
        fit_variance_scale(mu, torch.ones_like(mu), mu.argmax(-1), method=method)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_fit_temperature_recovers_a_known_temperature(temperature):
    logits = _logits(20_000, 5, seed=35, spread=2.5)
    labels = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=_gen(36))
    fit = fit_temperature(logits, labels[:, 0])
    assert fit.temperature == pytest.approx(temperature, rel=TOL["temperature_rel"])
    plain = -torch.log_softmax(logits, -1).gather(-1, labels).mean().item()
    assert fit.nll < plain


# --------------------------------------------------------------------------- errors


def _bad_moments():
    mu = torch.zeros(4, 3, dtype=F64)
    nan = mu.clone()
    nan[1, 2] = float("nan")
    inf = torch.ones_like(mu)
    inf[0, 0] = float("inf")
    neg = torch.ones_like(mu)
    neg[2, 1] = -1e-3
    return [
        ("list", [[0.0, 1.0]], torch.ones(1, 2), InputError, "torch.Tensor"),
        ("int", torch.zeros(4, 3, dtype=torch.int64), torch.ones(4, 3), InputError, "int64"),
        ("dtype", mu, torch.ones(4, 3, dtype=torch.float32), InputError, "dtype mismatch"),
        ("shape", mu, torch.ones(4, 1, dtype=F64), InputError, r"mean\(4, 3\), var\(4, 1\)"),
        (
            "one class",
            torch.zeros(4, 1, dtype=F64),
            torch.ones(4, 1, dtype=F64),
            InputError,
            "C >= 2",
        ),
        (
            "scalar",
            torch.tensor(0.0, dtype=F64),
            torch.tensor(1.0, dtype=F64),
            InputError,
            "C >= 2",
        ),
        ("nan mean", nan, torch.ones_like(mu), NonFiniteError, "mean has 1 non-finite"),
        ("inf var", mu, inf, NonFiniteError, "var has 1 non-finite"),
        ("negative var", mu, neg, InputError, "non-negative"),
    ]


@pytest.mark.parametrize(("case", "mean", "var", "error", "match"), _bad_moments())
@pytest.mark.parametrize(
    "fn",
    [
        probit,
        probit_argmax_preserving,
        monte_carlo,
        laplace_bridge,
        lambda m, v: predict_classes(Moments(m, v)),
    ],
)
def test_bad_moments_raise_typed_errors(case, mean, var, error, match, fn):
    with pytest.raises(error, match=match):
        fn(mean, var)
    assert issubclass(error, ValueError)


def test_bad_labels_and_options_raise_typed_errors():
    mu, var = _logits(6, 3, seed=37), torch.ones(6, 3, dtype=F64)
    good = mu.argmax(-1)
    with pytest.raises(InputError, match="integer tensor"):
        fit_variance_scale(mu, var, good.to(F64))
    with pytest.raises(InputError, match=r"labels\(6, 1\)"):
        fit_variance_scale(mu, var, good[:, None])
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        fit_temperature(mu, good + 3)
    with pytest.raises(InputError, match="empty"):
        fit_temperature(mu[:0], good[:0])
    with pytest.raises(NonFiniteError, match="logits"):
        fit_temperature(mu.log(), good)  # NaN from log of negative logits
    with pytest.raises(ConfigurationError, match="bounds"):
        fit_temperature(mu, good, bounds=(0.0, 10.0))
    with pytest.raises(ConfigurationError, match="unknown method"):
        predict_classes(Moments(mu, var), "softmax")
    with pytest.raises(ConfigurationError, match="unknown ood_score"):
        predict_classes(Moments(mu, var), ood_score="energy")
    with pytest.raises(ConfigurationError, match="variance_scale"):
        predict_classes(Moments(mu, var), variance_scale=-1.0)
    with pytest.raises(NonFiniteError, match="overflows"):
        predict_classes(Moments(mu, var * 1e300), "monte_carlo", variance_scale=1e300)
    with pytest.raises(ConfigurationError, match="n_samples"):
        monte_carlo(mu, var, n_samples=0)
    with pytest.raises(InputError, match=r"torch\.Generator"):
        monte_carlo(mu, var, 10, generator=0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"gapa\.Moments"):
        predict_classes((mu, var))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- class axis


def test_class_dim_moves_the_class_axis_and_nothing_else():
    """(N, C, H, W) logits with ``class_dim=1`` give the class-last results, with ``probs``
    keeping the class axis at 1 and every score an (N, H, W) map. The default method works in
    place along the axis: its softmax rounds as ``torch.softmax(x, 1)`` does, the others are the
    class-last computation on a moved copy, bit for bit."""
    mu = _logits(2 * 5 * 6, 4, seed=40).reshape(2, 5, 6, 4)
    var = _hetero_var(2 * 5 * 6, 4, seed=41).reshape(2, 5, 6, 4)
    last = Moments(mu, var)
    first = Moments(mu.movedim(-1, 1).contiguous(), var.movedim(-1, 1).contiguous())
    for method in ("argmax_preserving", "probit", "laplace_bridge"):
        want = predict_classes(last, method, ood_score="total_variance")
        got = predict_classes(first, method, ood_score="total_variance", class_dim=1)
        assert got.probs.shape == (2, 4, 5, 6)
        pairs = [(got.probs, want.probs.movedim(-1, 1)),
                 (got.predictive_entropy, want.predictive_entropy)]
        for a, b in pairs:
            if method == "argmax_preserving":
                torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
            else:
                assert torch.equal(a, b)
        for field in ("predicted", "total_logit_variance", "predicted_logit_variance",
                      "ood_score"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field
            assert getattr(got, field).shape == (2, 5, 6)
        if method == "laplace_bridge":
            assert torch.equal(got.concentration, want.concentration.movedim(-1, 1))
    # with no variance the default is the softmax along the class axis, bit for bit
    zero = predict_classes(Moments(first.mean, torch.zeros_like(first.var)), class_dim=1)
    assert torch.equal(zero.probs, torch.softmax(first.mean, 1))
    # a negative axis names the same dimension
    assert torch.equal(predict_classes(first, class_dim=-3).probs,
                       predict_classes(first, class_dim=1).probs)


@pytest.mark.parametrize("class_dim", [4, -5, 1.0, True])
def test_class_dim_outside_the_logits_is_refused(class_dim):
    m = Moments(torch.zeros(2, 3, 4, 4, dtype=F64), torch.ones(2, 3, 4, 4, dtype=F64))
    with pytest.raises(InputError, match="class_dim"):
        predict_classes(m, class_dim=class_dim)


def test_scored_positions_with_the_class_axis_first():
    from gapa.predictive.classification import scored_positions

    mu = _logits(3 * 4 * 4, 5, seed=42).reshape(3, 4, 4, 5)
    var = _hetero_var(3 * 4 * 4, 5, seed=43).reshape(3, 4, 4, 5)
    labels = torch.randint(5, (3, 4, 4), generator=_gen(44))
    labels[0, 0, 0] = -100
    want = scored_positions(Moments(mu, var), labels)
    got = scored_positions(Moments(mu.movedim(-1, 1), var.movedim(-1, 1)), labels, class_dim=1)
    assert len(got[0]) == 3 * 16 - 1
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_finite_moments_whose_sums_overflow_are_accepted():
    """The finiteness checks reduce by a sum first; finite values that overflow it still pass,
    and an empty batch has nothing to check."""
    from gapa.moments import all_finite

    big = torch.full((64, 3), 3e38, dtype=torch.float32)
    assert not bool(torch.isfinite(big.sum())) and all_finite(big)
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([1.0, -float("inf")]))
    mean = torch.zeros(64, 3, dtype=torch.float32)
    out = predict_classes(Moments(mean, big))
    assert out.total_logit_variance.isinf().all()  # a sum of the caller's own finite values
    empty = predict_classes(Moments(torch.zeros(0, 3, dtype=F64), torch.zeros(0, 3, dtype=F64)))
    assert empty.probs.shape == (0, 3)
