"""The baselines that train their own networks (MC dropout, deep ensembles) and what they need
from the backbone cache: the dropout architecture, the dropout rate in the cache key, and the
recorded training time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gapa import ConfigurationError
from gapa_bench.backbones import cache_dir, cached_regressor, mlp, training_seconds
from gapa_bench.baselines import dropout as mc
from gapa_bench.baselines.dropout import fit_mc_dropout, mc_dropout_samples
from gapa_bench.baselines.ensemble import fit_ensemble, member_seeds
from gapa_bench.data import from_arrays

TRAIN = {"width": 16, "depth": 2, "max_epochs": 3}


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("GAPA_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    y = np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * rng.normal(size=300)
    return from_arrays(x, y, name="toy", feature_names=["a", "b", "c"], sizes=(180, 60, 60),
                       split="row-order 60/20/20")


@pytest.fixture
def backbone(data):
    return cached_regressor(data, seed=0, progress=False, **TRAIN)[0]


def cached_files() -> set[str]:
    return {p.name for p in (cache_dir() / "backbones").iterdir()}


def _check_moments(pred, n: int) -> None:
    assert pred.mean.shape == pred.var.shape == (n, 1)
    assert torch.isfinite(pred.mean).all() and torch.isfinite(pred.var).all()
    assert (pred.var > 0).all()


def test_mlp_without_dropout_keeps_the_published_module_names():
    plain, zero = mlp(3), mlp(3, dropout=0.0)
    kinds = [nn.Linear, nn.Tanh] * 3 + [nn.Linear]
    for net in (plain, zero):
        assert [name for name, _ in net.named_children()] == [str(i) for i in range(7)]
        assert [type(m) for m in net] == kinds
    with_dropout = mlp(3, dropout=0.2)
    assert [type(m) for m in with_dropout] == [nn.Linear, nn.Tanh, nn.Dropout] * 3 + [nn.Linear]
    assert all(m.p == 0.2 for m in with_dropout if isinstance(m, nn.Dropout))


def test_dropout_rate_is_part_of_the_cache_key(data, backbone):
    plain_path = cached_regressor(data, progress=False, **TRAIN)[1]
    assert cached_regressor(data, progress=False, dropout=0.0, **TRAIN)[1] == plain_path
    net, path, trained = cached_regressor(data, progress=False, dropout=0.1, **TRAIN)
    assert trained and path != plain_path
    loaded, _, again = cached_regressor(data, progress=False, dropout=0.1, **TRAIN)
    assert not again
    assert [type(m) for m in loaded] == [type(m) for m in net]
    assert any(isinstance(m, nn.Dropout) for m in loaded)


def test_training_seconds_recorded_and_old_files_retrained(data, backbone):
    path = cached_regressor(data, progress=False, **TRAIN)[1]
    assert training_seconds(path) > 0
    # a file cached by an older gapa (no training time) is retrained, not trusted
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    assert training_seconds(path) is None
    assert cached_regressor(data, progress=False, **TRAIN)[2]
    assert training_seconds(path) > 0


def test_stochastic_passes_are_inverted_dropout():
    # one dropout layer on ones: each output is 0 or 1 / (1 - p), zero with probability p
    p, x = 0.25, torch.ones(2000, 1)
    draws = mc_dropout_samples(nn.Sequential(nn.Dropout(p)), x, samples=10, seed=0)
    assert ((draws == 0) | torch.isclose(draws, torch.tensor(1 / (1 - p)))).all()
    assert abs((draws == 0).float().mean().item() - p) < 0.02  # 20k Bernoulli draws: 6.5 sd


def test_mc_dropout_predict(data, backbone):
    fitted = fit_mc_dropout(backbone, data, seed=0, progress=False, train=TRAIN, p=0.1,
                            samples=30)
    x = data.x_test
    pred = fitted.predict(x)
    _check_moments(pred, len(x))
    again = fitted.predict(x)
    assert torch.equal(pred.mean, again.mean) and torch.equal(pred.var, again.var)
    assert fitted.info == {"p": 0.1, "samples": 30, "trained_now": True}

    # by hand: the dropout network, x repeated 30 times, masks from a generator seeded 0
    net, path, trained = cached_regressor(data, seed=0, dropout=0.1, progress=False, **TRAIN)
    assert not trained
    gen, h = torch.Generator().manual_seed(0), x.repeat(30, 1)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Dropout):
                h = h * torch.empty_like(h).bernoulli_(0.9, generator=gen) / 0.9
            else:
                h = layer(h)
    draws = h.view(30, len(x), 1)
    assert torch.allclose(pred.mean, draws.mean(0), rtol=0, atol=1e-6)
    assert torch.allclose(pred.var, draws.var(0), rtol=1e-5, atol=0)
    with torch.no_grad():  # the MC mean is not the deterministic network's output
        assert not torch.equal(pred.mean, net(x))

    assert fitted.fit_s == training_seconds(path) > 0
    cached = fit_mc_dropout(backbone, data, seed=0, progress=False, train=TRAIN, p=0.1,
                            samples=30)
    assert cached.info["trained_now"] is False and cached.fit_s == fitted.fit_s
    assert torch.equal(cached.predict(x).var, pred.var)


def test_mc_dropout_chunks_rows_and_passes(data, backbone, monkeypatch):
    fitted = fit_mc_dropout(backbone, data, seed=0, progress=False, train=TRAIN, samples=7)
    monkeypatch.setattr(mc, "CHUNK_ROWS", 25)  # 60 rows: blocks of 25, 25, 10; 1 or 2 passes each
    pred = fitted.predict(data.x_test)
    _check_moments(pred, len(data.x_test))
    net = cached_regressor(data, seed=0, dropout=0.1, progress=False, **TRAIN)[0]
    draws = mc_dropout_samples(net, data.x_test, samples=7, seed=0)
    assert draws.shape == (7, len(data.x_test), 1)
    assert torch.equal(pred.mean, draws.mean(0)) and torch.equal(pred.var, draws.var(0))


def test_ensemble_predict(data, backbone):
    before = cached_files()
    fitted = fit_ensemble(backbone, data, seed=0, progress=False, train=TRAIN, members=3)
    seeds = member_seeds(0, 3)
    assert seeds == [0, 1000, 2000]
    assert fitted.info == {"members": 3, "member_seeds": seeds}
    after = cached_files()
    assert len(after - before) == 2  # member 0 is the cached backbone
    x = data.x_test
    pred = fitted.predict(x)
    _check_moments(pred, len(x))
    again = fitted.predict(x)
    assert torch.equal(pred.mean, again.mean) and torch.equal(pred.var, again.var)

    loaded = [cached_regressor(data, seed=s, progress=False, **TRAIN) for s in seeds]
    assert not any(trained for _, _, trained in loaded)
    with torch.no_grad():
        assert torch.equal(loaded[0][0](x), backbone(x))
        means = torch.stack([net(x) for net, _, _ in loaded])
    m = means.mean(0)
    assert torch.allclose(pred.mean, m, rtol=0, atol=1e-6)
    assert torch.allclose(pred.var, ((means - m) ** 2).mean(0), rtol=1e-5, atol=1e-12)
    assert fitted.fit_s == sum(training_seconds(path) for _, path, _ in loaded) > 0

    cached = fit_ensemble(backbone, data, seed=0, progress=False, train=TRAIN, members=3)
    assert cached_files() == after
    assert cached.fit_s == fitted.fit_s
    assert torch.equal(cached.predict(x).mean, pred.mean)
    assert torch.equal(cached.predict(x).var, pred.var)


@pytest.mark.parametrize(
    ("fit", "options"),
    [(fit_mc_dropout, {"p": 0.0}), (fit_mc_dropout, {"p": 1.0}),
     (fit_mc_dropout, {"samples": 1}), (fit_ensemble, {"members": 1})],
)
def test_invalid_options_are_refused_before_training(fit, options, data, backbone):
    before = cached_files()
    with pytest.raises(ConfigurationError):
        fit(backbone, data, seed=0, progress=False, train=TRAIN, **options)
    assert cached_files() == before
