"""GP sites that stay right on awkward networks and refuse settings that cannot be right.

A unit whose pre-activation is constant over the training data (a pruned unit: zero weights,
a bias) gets the floored lengthscale, so its scaled coordinate is ~1e6 on every row; it must not
change anyone's neighbours. Saved indexes built on another search space are rebuilt, and
non-finite or non-positive settings are refused with a ConfigurationError naming them.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import gapa
from gapa.gp.kernels import check_overrides
from gapa.gp.search import NeighbourIndex
from gapa.gp.site import SEARCH_SPACE, GPConfig, GPSite, constant_units
from helpers import mlp

WIDTH = 16
CONSTANT = 0.7  # the pruned unit's bias: its pre-activation on every input


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(400, 3, generator=gen), 1.5 * torch.randn(200, 3, generator=gen)


def with_constant_unit(model: nn.Sequential, linear: int = 0) -> nn.Sequential:
    """``model`` with one more unit after ``model[linear]``: zero in-weights, bias
    :data:`CONSTANT`, zero out-weight, so the network computes exactly the same function."""
    model = copy.deepcopy(model)
    first, second = model[linear], model[linear + 2]
    wide = nn.Linear(first.in_features, first.out_features + 1)
    after = nn.Linear(second.in_features + 1, second.out_features)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:-1] = first.weight
        wide.bias[:-1] = first.bias
        wide.bias[-1] = CONSTANT
        after.weight.zero_()
        after.weight[:, :-1] = second.weight
        after.bias.copy_(second.bias)
    model[linear], model[linear + 2] = wide, after
    return model.eval()


def _pair(**options):
    """The same network fitted without and with a constant unit in layer "1"."""
    base = mlp([3, WIDTH, WIDTH, 1], seed=1)
    wide = with_constant_unit(base)
    x, q = _data()
    fitted = [gapa.GAPA(net, ["1"], **options).fit(x, progress=False) for net in (base, wide)]
    return fitted, q


# --- 1. constant units change no one's neighbours ----------------------------------------------


@pytest.mark.parametrize(("search", "m", "k"), [
    ("torch", None, 1), ("torch", 64, 4), ("faiss", None, 1), ("faiss", 64, 1),
    ("ivf", None, 4), ("auto", 64, 1),
])
def test_a_constant_unit_changes_no_neighbour_and_no_variance(search, m, k):
    (a, b), q = _pair(search=search, m=m, k=k)
    site_a, site_b = a.sites["1"], b.sites["1"]
    za, zb = a.pre_activations(q)["1"], b.pre_activations(q)["1"]
    assert torch.equal(zb[:, :WIDTH], za) and bool((zb[:, WIDTH] == CONSTANT).all())
    # inducing points (k-means on the search space) and neighbours are those without the unit
    assert torch.equal(site_b.rows[:, :WIDTH], site_a.rows)
    assert bool((site_b.rows[:, WIDTH] == CONSTANT).all())
    assert torch.equal(site_b._neighbours(zb, k), site_a._neighbours(za, k))
    assert site_b.search_space.dim == WIDTH
    assert torch.equal(site_b.variance(zb)[:, :WIDTH], site_a.variance(za))
    out_a, out_b = a(q), b(q)
    assert torch.equal(out_b.mean, out_a.mean)
    torch.testing.assert_close(out_b.var, out_a.var, rtol=1e-6, atol=0)
    assert bool(torch.isfinite(out_b.var).all())


def test_a_constant_unit_in_a_store_fit(tmp_path):
    """From an activation store the k-means sample and the counts are read shard by shard;
    the search space is applied to each."""
    base = mlp([3, WIDTH, WIDTH, 1], seed=1)
    x, q = _data()
    fits = [gapa.GAPA(net, ["1"], m=32).fit(x, progress=False, store=tmp_path / name)
            for net, name in ((base, "a"), (with_constant_unit(base), "b"))]
    rows_a, rows_b = (gm.sites["1"].rows for gm in fits)
    assert torch.equal(rows_b[:, :WIDTH], rows_a)
    torch.testing.assert_close(fits[1](q).var, fits[0](q).var, rtol=1e-6, atol=0)


@pytest.mark.parametrize("conditioning", ["local", "exact"])
def test_float32_search_finds_the_float64_nearest_row(conditioning):
    """The original failure: with the constant unit the float32 search cancelled and picked
    the wrong nearest row for nearly every query (mean output variance 0.158 -> 0.279)."""
    (_, gm), q = _pair(search="torch", m=None, conditioning=conditioning)
    site = gm.sites["1"]
    z = gm.pre_activations(q)["1"]
    ls = site.fitted_lengthscale.double()
    diff = (z.double()[:, None, :WIDTH] - site.rows.double()[None, :, :WIDTH]) / ls[:WIDTH]
    d2 = diff.square().sum(-1)  # float64 brute force on the informative units
    best = d2.min(1).values
    found = d2.gather(1, site._neighbours(z, 1)).squeeze(1)
    assert bool((found <= best * (1 + 1e-5)).all())
    # the kernel's distance over every unit: the constant one adds 0 at these queries
    torch.testing.assert_close(site.nearest_distance(z).double(), best.sqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("options", [
    {"m": None}, {"m": None, "k": 3}, {"m": 64}, {"m": 64, "inducing": "random"},
    {"m": None, "search": "faiss"}, {"m": None, "search": "ivf"},
    {"m": 64, "conditioning": "exact"},
])
def test_every_unit_constant(options):
    """A layer whose units are all pruned: every row is as near; no NaN anywhere."""
    model = mlp([3, 8, 1], seed=2)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.linspace(-1, 1, 8))
    x, q = _data()
    gm = gapa.GAPA(model, **options).fit(x, progress=False)
    site = gm.sites["1"]
    assert site.search_space.dim == 0 and site.index is None
    assert site.n_conditioning == (1 if options["m"] else len(x))
    z = gm.pre_activations(q)["1"]
    var = site.variance(z)
    hp = site.hyperparameters
    r = hp.noise / len(x) if options["m"] else hp.noise  # one row standing for all of them
    # every query sits on the rows; with k > 1 the K copies are as good as one K-fold row
    if options.get("k", 1) == 1 and options.get("conditioning") != "exact":
        torch.testing.assert_close(var, (hp.amplitude * r / (1 + r)).expand_as(var))
    assert bool(torch.isfinite(var).all()) and bool((var > 0).all())
    assert bool(torch.isfinite(gm(q).var).all())
    assert bool((site.nearest_distance(z) == 0).all())
    assert "no unit varies" in site.describe() or "exact" in site.describe()


def test_what_counts_as_constant():
    """Equal, or apart by a few rounding errors of their magnitude (not information); tiny
    values that do differ are information."""
    f32 = torch.float32
    lo = torch.tensor([0.7, 0.7, 1000.0, 0.0, 0.0, -3.0, 1e30], dtype=f32)
    ulp = torch.nextafter(lo, torch.tensor(math.inf, dtype=f32)) - lo
    hi = lo + torch.tensor([0, 2, 0, 0, 0, 0, 0], dtype=f32) * ulp
    hi[2], hi[4], hi[5], hi[6] = 1000.01, 1e-30, -3.0 + 100 * float(ulp[5]), 2e30
    assert constant_units(lo, hi).tolist() == [True, True, False, True, False, False, False]


# --- 2. a saved index on another search space is rebuilt -----------------------------------------


def _restore(site: GPSite, index_state: dict | None) -> GPSite:
    return GPSite.restore(site.key, site.config, site.rows, site.counts, site.hyperparameters,
                          site.cache_size, 1.0, index_state)


@pytest.mark.parametrize("search", ["ivf", "hnsw"])
def test_an_index_saved_on_the_old_search_space_is_rebuilt(search):
    (_, gm), q = _pair(search=search, m=None, k=2)
    site = gm.sites["1"]
    z = gm.pre_activations(q)["1"]
    # what an earlier gapa saved: an index over rows / lengthscale, every unit, uncentred (the
    # constant unit sits at a ~1e6 coordinate; whether the recall target is met there does not
    # matter here)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "below the recall target", RuntimeWarning)
        old = NeighbourIndex(site.rows / site.fitted_lengthscale, search, k=2, seed=0).state()
    assert "space" not in old
    for state in (old, {**site.index.state(), "space": "some-other-space"}):
        restored = _restore(site, state)
        assert restored.index.state()["space"] == SEARCH_SPACE
        assert restored.index.dim == WIDTH  # the constant unit is not in it
        assert torch.equal(restored.variance(z), site.variance(z))


def test_an_index_saved_on_this_search_space_is_not_retrained(monkeypatch):
    (_, gm), q = _pair(search="ivf", m=None)
    site = gm.sites["1"]
    state = site.index.state()
    assert state["space"] == SEARCH_SPACE

    def retrain(self):
        raise AssertionError("the approximate index was retrained")

    monkeypatch.setattr(NeighbourIndex, "_build_approximate", retrain)
    z = gm.pre_activations(q)["1"]
    assert torch.equal(_restore(site, state).variance(z), site.variance(z))


@pytest.mark.parametrize("search", ["torch", "ivf"])
def test_round_trip_with_a_constant_unit(tmp_path, search):
    (_, gm), q = _pair(search=search, m=64)
    model = gm.model
    loaded = gapa.GAPA.load(gm.save(tmp_path / "s.gapa"), model)
    assert torch.equal(loaded(q).var, gm(q).var)


# --- 3. settings that cannot be right are refused ------------------------------------------------


@pytest.mark.parametrize(("option", "value"), [
    ("noise_ratio", math.nan), ("noise_ratio", math.inf), ("noise_ratio", -1e-2),
    ("noise_ratio", 0.0), ("noise_ratio", "0.1"), ("noise_ratio", True), ("lengthscale_quantile", 0.0), ("lengthscale_quantile", 1.5),
    ("lengthscale_quantile", math.nan), ("amplitude_rule", "max2"), ("seed", -1),
    ("lengthscale_rule", "ml"),
    ("seed", 1.5), ("k", True), ("noise_by_count", "yes"),
])
def test_bad_constructor_settings_are_refused(option, value):
    with pytest.raises(gapa.ConfigurationError, match=rf"{option}.*{value!r}"):
        gapa.GAPA(mlp([3, 8, 1]), **{option: value})
    with pytest.raises(gapa.ConfigurationError, match=option):
        GPConfig(**{option: value})


def test_a_quantile_of_one_is_allowed():
    x, _ = _data()
    gm = gapa.GAPA(mlp([3, 8, 1]), lengthscale_quantile=1.0).fit(x, progress=False)
    assert bool(torch.isfinite(gm.sites["1"].hyperparameters.lengthscale).all())


BAD_OVERRIDES = [
    ({"noise_ratio": math.nan}, r"noise_ratio override must be positive and finite \(layer '1'\), got nan"),
    ({"noise_ratio": math.inf}, r"noise_ratio .*layer '1'.*got inf"),
    ({"noise_ratio": -1.0}, r"noise_ratio .*layer '1'.*got -1\.0"),
    ({"noise_ratio": torch.full((8,), 0.1)}, r"noise_ratio override has shape \(8,\) \(layer '1'\)"),
    ({"amplitude": math.inf}, r"amplitude .*layer '1'.*got inf"),
    ({"lengthscale": math.inf}, r"lengthscale .*layer '1'.*got inf"),
    ({"lengthscale": 0.0}, r"lengthscale override must be positive"),
    ({"lengthscale": torch.tensor([1.0, 1.0, 1.0, math.nan, 1.0, 1.0, 1.0, 1.0])},
     r"lengthscale .*layer '1'.*got nan at unit 3"),
    ({"amplitude": [1.0] * 7 + [-2.0]}, r"amplitude .*layer '1'.*got -2\.0 at unit 7"),
    ({"amplitude": "big"}, r"amplitude override \(layer '1'\) must be a number"),
    ({"lengthscale": torch.ones(8, 1)}, r"lengthscale override has shape \(8, 1\)"),
    ({"scale": 1.0}, r"unknown hyperparameter\(s\) \['scale'\].*layer '1'"),
]


@pytest.mark.parametrize(("values", "message"), BAD_OVERRIDES)
def test_bad_overrides_are_refused(values, message):
    with pytest.raises(gapa.ConfigurationError, match=message):
        check_overrides({"1": values})
    x, _ = _data()
    with pytest.raises(gapa.ConfigurationError, match=message):  # at construction or at fit
        gapa.GAPA(mlp([3, 8, 1]), hyperparameters={"1": values}).fit(x, progress=False)


def test_override_mapping_shape_is_checked():
    with pytest.raises(gapa.ConfigurationError, match="must map layer names"):
        check_overrides([("1", {"noise_ratio": 0.1})])
    with pytest.raises(gapa.ConfigurationError, match=r"hyperparameters\['1'\] must map"):
        check_overrides({"1": 0.1})
    check_overrides({"1": {"lengthscale": torch.ones(8), "amplitude": 2, "noise_ratio": 1e-3}})


@pytest.mark.parametrize(("values", "message"), [
    ({"amplitude": torch.ones(3)}, r"amplitude override has shape \(3,\); the layer has 8 units"),
    ({"amplitude": 1e300}, r"amplitude override at layer '1' .*torch\.float32"),
    ({"lengthscale": 1e-60}, r"lengthscale override at layer '1' .*underflows"),
])
def test_overrides_the_layer_cannot_hold_are_refused_at_fit(values, message):
    check_overrides({"1": values})  # nothing wrong before the width and dtype are known
    x, _ = _data()
    with pytest.raises(gapa.ConfigurationError, match=message):
        gapa.GAPA(mlp([3, 8, 1]), hyperparameters={"1": values}).fit(x, progress=False)


def test_valid_overrides_are_used_as_given():
    x, q = _data()
    ls = torch.linspace(0.5, 2.0, 8)
    gm = gapa.GAPA(mlp([3, 8, 1]), hyperparameters={"1": {"lengthscale": ls, "noise_ratio": 1e-3}})
    hp = gm.fit(x, progress=False).sites["1"].hyperparameters
    assert torch.equal(hp.lengthscale, ls) and hp.noise == 1e-3
    ls[0] = 100.0  # the site holds its own copy
    assert hp.lengthscale[0] == 0.5
    assert bool(torch.isfinite(gm(q).var).all())
