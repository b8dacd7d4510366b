"""Every approximation against its reference: local K = N and inducing M = N against the exact
GP, K = 1 against the closed form of method.md, and the variance's shape in activation space."""

from __future__ import annotations

import pytest
import torch

import gapa
from gapa.gp.conditioning import ExactConditioner, local_variance, nearest_variance
from gapa.gp.kernels import Hyperparameters
from helpers import TOL, mlp


def _hp(d: int, gen) -> Hyperparameters:
    return Hyperparameters(
        lengthscale=0.5 + torch.rand(d, generator=gen, dtype=torch.float64),
        amplitude=0.5 + torch.rand(d, generator=gen, dtype=torch.float64),
        noise=1e-2,
    )


def test_local_with_all_rows_equals_exact(gen):
    n, d, b = 40, 5, 7
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    r = 1e-2 / torch.randint(1, 5, (n,), generator=gen).double()
    z = torch.randn(b, d, generator=gen, dtype=torch.float64) * 2
    hp = _hp(d, gen)
    exact = ExactConditioner(x, r, hp).variance(z)
    local = local_variance(z, x.expand(b, n, d), r.expand(b, n), hp)
    torch.testing.assert_close(local, exact, rtol=TOL["exact_vs_local"], atol=TOL["exact_vs_local"])


def test_exact_matches_textbook_formula(gen):
    """v_j(z) = k(z,z) - k(z,X) [K + S]^-1 k(X,z), written out densely for one unit."""
    n, d = 25, 3
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    r = torch.full((n,), 1e-2, dtype=torch.float64)
    z = torch.randn(4, d, generator=gen, dtype=torch.float64)
    hp = _hp(d, gen)
    got = ExactConditioner(x, r, hp).variance(z)
    for j in range(d):
        a, ell = hp.amplitude[j], hp.lengthscale[j]

        def k(u, v, a=a, ell=ell):
            return a * torch.exp(-((u[:, None] - v[None, :]) ** 2) / (2 * ell**2))

        gram = k(x[:, j], x[:, j]) + torch.diag(r * a)
        cross = k(z[:, j], x[:, j])
        want = a - (cross @ torch.linalg.solve(gram, cross.T)).diagonal()
        torch.testing.assert_close(got[:, j], want, rtol=1e-10, atol=1e-12)


def test_k1_is_the_closed_form(gen):
    d, b = 6, 9
    z = torch.randn(b, d, generator=gen, dtype=torch.float64)
    xn = torch.randn(b, d, generator=gen, dtype=torch.float64)
    r = torch.full((b,), 1e-2, dtype=torch.float64)
    hp = _hp(d, gen)
    a, ell = hp.amplitude, hp.lengthscale
    kzx = a * torch.exp(-((z - xn) ** 2) / (2 * ell**2))
    want = a - kzx**2 / (a + r[:, None] * a)
    torch.testing.assert_close(nearest_variance(z, xn, r, hp), want, rtol=TOL["closed_form"], atol=0)
    # the general K-row path agrees with the closed form at K = 1
    exact_one = torch.stack(
        [ExactConditioner(xn[i : i + 1], r[i : i + 1], hp).variance(z[i : i + 1])[0] for i in range(b)]
    )
    torch.testing.assert_close(exact_one, want, rtol=1e-10, atol=1e-14)


def _fit(net, x, **kw):
    return gapa.GAPA(net, ["1", "3"], **kw).fit(x, progress=False)


@pytest.mark.parametrize("search", ["torch", "faiss"])
def test_gapa_local_k_equals_n_equals_exact(search, gen):
    net = mlp([3, 12, 12, 1]).double()
    x = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    q = torch.randn(15, 3, generator=gen, dtype=torch.float64) * 2
    exact = _fit(net, x, conditioning="exact", m=None)(q)
    local = _fit(net, x, k=60, m=None, search=search)(q)
    torch.testing.assert_close(local.var, exact.var, rtol=1e-9, atol=1e-14)


def test_gapa_inducing_m_equals_n_equals_exact(gen):
    net = mlp([3, 12, 12, 1]).double()
    x = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    q = torch.randn(15, 3, generator=gen, dtype=torch.float64) * 2
    exact = _fit(net, x, conditioning="exact", m=None)(q)
    for m in (60, 1000):
        gm = _fit(net, x, conditioning="exact", m=m)
        assert gm.sites["1"].n_conditioning == 60
        torch.testing.assert_close(gm(q).var, exact.var, rtol=1e-12, atol=0)


def test_gapa_k1_uses_the_nearest_row(gen):
    net = mlp([3, 12, 1]).double()
    x = torch.randn(80, 3, generator=gen, dtype=torch.float64)
    q = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    gm = gapa.GAPA(net, ["1"], k=1, m=None).fit(x, progress=False)
    site = gm.sites["1"]
    hp = site.hyperparameters
    z = net[0](q)
    nearest = torch.cdist(z / hp.lengthscale, site.rows / hp.lengthscale).argmin(1)
    want = nearest_variance(z, site.rows[nearest], site.row_noise[nearest], hp)
    # through the last Linear layer: squared weights
    torch.testing.assert_close(gm(q).var, want @ net[2].weight.T.square(), rtol=1e-12, atol=0)


def test_inducing_counts_cover_the_cache(gen):
    net = mlp([3, 12, 1])
    x = torch.randn(500, 3, generator=gen)
    for inducing in ("kmeans", "random"):
        gm = gapa.GAPA(net, ["1"], k=4, m=50, inducing=inducing).fit(x, progress=False)
        site = gm.sites["1"]
        assert site.cache_size == 500 and 4 <= site.n_conditioning <= 50
        assert int(site.counts.sum()) == 500
        torch.testing.assert_close(site.row_noise, site.hyperparameters.noise / site.counts.float())


def test_variance_near_floor_on_training_rows_and_grows_away(gen):
    net = mlp([3, 16, 16, 1]).double()
    x = torch.randn(400, 3, generator=gen, dtype=torch.float64)
    gm = gapa.GAPA(net, ["1"], k=8, m=None, noise_ratio=1e-4).fit(x, progress=False)
    site = gm.sites["1"]
    z = net[0](x[:50])
    v_train = site.variance(z)
    amp = site.hyperparameters.amplitude
    # at a cached row the posterior variance is about the noise, far below the prior amplitude
    assert bool((v_train <= 2e-4 * amp).all())
    direction = torch.randn(1, 3, generator=gen, dtype=torch.float64)
    totals = [gm(x[:50] + s * direction).var.mean().item() for s in (0.0, 1.0, 3.0, 10.0, 100.0)]
    assert totals == sorted(totals) and totals[-1] > 100 * totals[0]
    # far away every unit returns to its prior amplitude
    far = site.variance(net[0](x[:5] * 1e3))
    torch.testing.assert_close(far, amp.expand_as(far), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("conditioning", "k"), [("local", 4), ("local", 1), ("exact", 1)])
def test_rescaled_lengthscale_equals_a_site_fitted_with_it(conditioning, k, gen):
    """A common factor on the lengthscales keeps the neighbours, so rescaling a fitted site is
    the same GP as fitting one with the scaled lengthscales from the start."""
    net = mlp([3, 12, 12, 1]).double()
    x = torch.randn(80, 3, generator=gen, dtype=torch.float64)
    q = torch.randn(15, 3, generator=gen, dtype=torch.float64) * 2
    gm = _fit(net, x, conditioning=conditioning, k=k, m=None)
    fitted = {key: site.hyperparameters.lengthscale for key, site in gm.sites.items()}
    gm.lengthscale_factor = 0.3
    ref = _fit(net, x, conditioning=conditioning, k=k, m=None,
               hyperparameters={key: {"lengthscale": 0.3 * ls} for key, ls in fitted.items()})
    torch.testing.assert_close(gm(q).var, ref(q).var, rtol=1e-12, atol=1e-15)
    gm.lengthscale_factor = 1.0  # factors are relative to the fit, not cumulative
    torch.testing.assert_close(gm(q).var, _fit(net, x, conditioning=conditioning, k=k, m=None)(q).var,
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
def test_calibrate_chooses_the_lengthscale_factor_by_validation_nll(gen, propagation):
    """One factor at a time is the plain predictive; several at once reuse one backward pass
    for the Jacobian rule, and must give the same NLLs to the last bit."""
    net = mlp([3, 12, 12, 1]).double()
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    xv = torch.randn(100, 3, generator=gen, dtype=torch.float64) * 1.5
    with torch.no_grad():
        yv = net(xv) + 0.3 * xv[:, :1].abs() * torch.randn(100, 1, generator=gen, dtype=torch.float64)
    gm = _fit(net, x, m=None, propagation=propagation)
    nlls = {}
    for f in (0.125, 0.5, 2.0):
        nlls[f] = gm.calibrate(xv, yv, lengthscale_factors=[f]).nll
        assert gm.lengthscale_factor == f
    best = gm.calibrate(xv, yv, lengthscale_factors=list(nlls))
    assert gm.lengthscale_factor == min(nlls, key=nlls.get)
    assert best.nll == min(nlls.values())
    assert len(set(nlls.values())) == 3  # the factor matters, so the choice is not vacuous
    with torch.no_grad():
        assert torch.equal(gm(xv).mean, net(xv))
    # None keeps the current lengthscales
    assert gm.calibrate(xv, yv, lengthscale_factors=None).nll == best.nll
    with pytest.raises(gapa.ConfigurationError, match="positive"):
        gm.calibrate(xv, yv, lengthscale_factors=[0.0])


def test_a_flat_validation_nll_keeps_the_rules_lengthscale(gen):
    """When no factor is strictly better (e.g. the fitted variance scale is 0 for all of them),
    the calibration keeps the label-free rule's lengthscale (factor 1), whatever the order."""
    net = mlp([3, 12, 12, 4]).double()
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    gm = _fit(net, x, m=None)
    with torch.no_grad():
        labels = net(x[:50]).argmax(-1)  # the network is always right: variance only hurts
    fit = gm.calibrate_classifier(x[:50], labels, lengthscale_factors=[0.25, 4.0, 1.0, 0.5])
    assert fit.scale == 0.0 and gm.lengthscale_factor == 1.0


def test_classifier_calibration_in_batches_reuses_the_gradients_exactly(gen):
    net = mlp([3, 12, 4]).double()
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    xv = torch.randn(90, 3, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 4, (90,), generator=gen)
    gm = gapa.GAPA(net, propagation="jacobian", m=None).fit(x, progress=False)
    single = {f: gm.calibrate_classifier(xv, labels, lengthscale_factors=[f], batch_size=16).nll
              for f in (0.25, 1.0, 4.0)}
    fit = gm.calibrate_classifier(xv, labels, lengthscale_factors=list(single), batch_size=16)
    assert len(set(single.values())) == 3  # the factor matters
    assert fit.nll == min(single.values())
    assert gm.lengthscale_factor == min(single, key=single.get)


def test_prior_conditioning_is_the_prior_amplitude_everywhere(gen, tmp_path):
    """``conditioning="prior"``, the control: no query is conditioned, so every unit's variance
    is its prior amplitude, near the data as far from it; the rest of GAPA is unchanged."""
    net = mlp([3, 12, 12, 1]).double()
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    prior = _fit(net, x, conditioning="prior")
    local = _fit(net, x)
    site = prior.sites["1"]
    for q in (x[:5], 100 * x[:5]):
        z = prior.pre_activations(q)["1"]
        assert torch.equal(site.variance(z), site.hyperparameters.amplitude.expand_as(z))
        assert bool((local.sites["1"].variance(z) <= site.variance(z) + 1e-12).all())
    assert torch.equal(prior(x[:5]).mean, local(x[:5]).mean)
    assert "prior" in prior.summary() and site.n_conditioning == 1
    loaded = gapa.GAPA.load(prior.save(tmp_path / "prior.gapa"), net)
    assert torch.equal(loaded(x[:5]).var, prior(x[:5]).var)


def test_layer_scores_rank_far_inputs_above_training_inputs():
    model = mlp([3, 16, 16, 1])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=gen)
    gm = gapa.GAPA(model, ["1", "3"], m=None).fit(x)
    near, far = gm.layer_scores(x[:50]), gm.layer_scores(8 * torch.randn(50, 3, generator=gen))
    for key in ("1", "3"):
        assert near[key].shape == far[key].shape == (50,)
        assert float(near[key].max()) < 0.05 < float(far[key].min())
        assert float(far[key].max()) <= 1.0


def test_lengthscale_quantile_is_that_of_the_nonzero_pairwise_differences():
    """The per-unit quantile skips zero differences (duplicated rows) and matches numpy's."""
    import numpy as np

    from gapa.gp.kernels import pairwise_difference_quantile

    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:20, 1] = 0.5  # half the rows share one value in unit 1
    x[:, 4] = 2.0  # no distinct values at all
    got = pairwise_difference_quantile(x, 0.3, 500, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same pairs
    i = torch.randint(40, (500,), generator=g)
    j = (i + torch.randint(1, 40, (500,), generator=g)) % 40
    diff = (x[i] - x[j]).abs().numpy()
    for unit in range(4):
        d = diff[:, unit]
        assert got[unit].item() == pytest.approx(np.quantile(d[d > 0], 0.3), rel=1e-12)
    assert got[4].item() == 0.0
