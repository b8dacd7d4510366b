"""The marginal-likelihood hyperparameter rule against the Gaussian density it maximises.

The profile log likelihood must be the log density of the centred activations under
``N(0, a* (C + s I))`` and ``a*`` its maximiser; on draws of a GP with a known lengthscale the
rule must find it (to the grid's resolution); the mean path stays exact with the rule on.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import MultivariateNormal

import gapa
from gapa.gp.kernels import estimate_hyperparameters
from gapa.gp.likelihood import (
    MIN_AMPLITUDE,
    marginal_likelihood_fit,
    profile_log_likelihood,
)
from helpers import mlp

NOISE = 1e-2


def _gram(u: torch.Tensor, lengthscale: float) -> torch.Tensor:
    return torch.exp(-0.5 * ((u[:, None] - u[None, :]) / lengthscale) ** 2) + NOISE * torch.eye(len(u), dtype=u.dtype)


def _log_density(u, y, lengthscale, amplitude) -> float:
    return float(MultivariateNormal(torch.zeros(len(u), dtype=u.dtype),
                                    amplitude * _gram(u, lengthscale)).log_prob(y))


def test_profile_is_the_gaussian_log_density_at_its_maximising_amplitude():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    y = torch.tanh(2 * u) + 0.1 * torch.randn(60, 3, generator=gen, dtype=torch.float64)
    y = y - y.mean(0)
    ls = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)
    ll, amp = profile_log_likelihood(u, y, ls, NOISE)
    for j in range(3):
        exact = _log_density(u[:, j], y[:, j], float(ls[j]), float(amp[j]))
        assert ll[j].item() == pytest.approx(exact, rel=1e-9)
        for scale in (0.9, 1.1):  # a* is the maximiser
            assert _log_density(u[:, j], y[:, j], float(ls[j]), scale * float(amp[j])) < exact


def _gp_draws(u: torch.Tensor, lengthscales: list[float], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cols = []
    for j, ls in enumerate(lengthscales):
        chol = torch.linalg.cholesky(_gram(u[:, j], ls))
        cols.append(chol @ torch.randn(len(u), generator=gen, dtype=u.dtype))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_rule_finds_the_lengthscale_of_gp_draws(seed):
    truth = [0.1, 0.4, 1.5]
    gen = torch.Generator().manual_seed(10 + seed)
    pre = torch.randn(128, 3, generator=gen, dtype=torch.float64)
    y = _gp_draws(pre, truth, seed)

    def activation(t: torch.Tensor) -> torch.Tensor:  # the draw at the cached rows
        assert torch.equal(t, pre)  # 128 rows: the subsample is the whole cache, in order
        return y

    ls, amp = marginal_likelihood_fit(pre, activation, pre.std(0), noise=NOISE,
                                      generator=torch.Generator().manual_seed(0))
    ratio = ls / (torch.tensor(truth, dtype=torch.float64))
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all()), ratio
    assert bool(((amp > 0.2) & (amp < 5.0)).all()), amp  # the draws have amplitude 1


def test_a_constant_activation_gets_the_smallest_amplitude_and_finite_values():
    pre = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    hp = estimate_hyperparameters(
        pre, lambda t: torch.zeros_like(t), lengthscale_quantile=0.25,
        amplitude_rule="marginal_likelihood", lengthscale_rule="marginal_likelihood",
        noise=NOISE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hp.amplitude, torch.full((2,), MIN_AMPLITUDE))
    assert bool(torch.isfinite(hp.lengthscale).all())
    assert hp.lengthscale.dtype == pre.dtype


def test_ml_amplitude_at_the_quantile_lengthscale_is_the_profile_maximiser():
    pre = 2 * torch.randn(500, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    common = dict(lengthscale_quantile=0.25, noise=NOISE, lengthscale_rule="quantile")
    quantile = estimate_hyperparameters(pre, torch.tanh, amplitude_rule="max1",
                                        generator=torch.Generator().manual_seed(3), **common)
    ml = estimate_hyperparameters(pre, torch.tanh, amplitude_rule="marginal_likelihood",
                                  generator=torch.Generator().manual_seed(3), **common)
    assert torch.equal(ml.lengthscale, quantile.lengthscale)
    # the same subsample the rule draws after the quantile's pairs
    gen = torch.Generator().manual_seed(3)
    torch.randint(500, (20_000,), generator=gen)
    torch.randint(1, 500, (20_000,), generator=gen)
    _, amp = marginal_likelihood_fit(pre, torch.tanh, quantile.lengthscale, noise=NOISE,
                                     generator=gen, grid=(1.0,))
    assert torch.equal(ml.amplitude, amp)


def test_gapa_with_the_rule_keeps_the_mean_exact_and_is_seeded():
    model = mlp([3, 32, 32, 1])
    gen = torch.Generator().manual_seed(0)
    x, q = torch.randn(400, 3, generator=gen), 2 * torch.randn(50, 3, generator=gen)
    options = dict(lengthscale_rule="marginal_likelihood", amplitude_rule="marginal_likelihood")
    a = gapa.GAPA(model, **options).fit(x, progress=False)
    b = gapa.GAPA(model, **options).fit(x, progress=False)
    out = a(q)
    with torch.no_grad():
        assert torch.equal(out.mean, model(q))
    assert torch.equal(out.var, b(q).var)
    assert bool(torch.isfinite(out.var).all()) and bool((out.var > 0).all())
    assert a.options()["lengthscale_rule"] == "marginal_likelihood"
    quantile = gapa.GAPA(model).fit(x, progress=False)
    for key, site in a.sites.items():  # the rule changed the kernel, not just its name
        assert not torch.equal(site.hyperparameters.lengthscale,
                               quantile.sites[key].hyperparameters.lengthscale)


def test_the_rule_reads_a_cache_on_disk_as_it_reads_one_in_memory(tmp_path):
    model = mlp([3, 16, 1])
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(2))
    options = dict(lengthscale_rule="marginal_likelihood", amplitude_rule="marginal_likelihood")
    memory = gapa.GAPA(model, **options).fit(x, progress=False)
    disk = gapa.GAPA(model, **options).fit(x, store=tmp_path / "cache", progress=False)
    for key, site in memory.sites.items():
        hp, other = site.hyperparameters, disk.sites[key].hyperparameters
        assert torch.equal(hp.lengthscale, other.lengthscale)
        assert torch.equal(hp.amplitude, other.amplitude)
