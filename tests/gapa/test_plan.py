"""gm.plan / gapa plan: sizes that match what a fit allocates, and a budget that refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gapa
from gapa.cli import main
from gapa.gp.site import Conditioning, GPConfig
from gapa.plan import parse_bytes, plan_fit
from helpers import mlp


@pytest.mark.parametrize(("text", "expected"), [
    ("4GiB", 4 * 2**30), ("512 MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5e3", 1500),
    (1024, 1024), ("3kib", 3072),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["four GiB", "4 parsecs", 0, -5, "", "1e400", "1.2.3GiB", "0.5",
                                 float("nan"), float("inf"), 0.5, True])
def test_parse_bytes_refuses(bad):
    with pytest.raises(gapa.ConfigurationError):
        parse_bytes(bad)


def test_plan_sizes_match_the_fit(tmp_path):
    model, x = mlp([3, 24, 40, 1], seed=0), torch.randn(3000, 3)
    gm = gapa.GAPA(model, layers=["1", "3"], m=100)
    plan = gm.plan(len(x), x[:4])
    assert [(s.key, s.width, s.cache_rows, s.conditioning_rows) for s in plan.sites] == [
        ("1", 24, 3000, 100), ("3", 40, 3000, 100)]
    cached = {k: v.numel() * v.element_size() for k, v in gm.fit(x, progress=False)
              .pre_activations(x).items()}
    assert {s.key: s.cache_bytes for s in plan.sites} == cached
    assert all(s.query_flops == 100 * s.width + s.width for s in plan.sites)  # search + K = 1
    # every cache, plus one site's chunks being concatenated (the measured peaks are in
    # benchmarks/RESULTS.md, from benchmarks/fit_scale.py)
    assert plan.peak_bytes >= sum(cached.values()) + max(cached.values())
    stored = gm.plan(len(x), x[:4], on_disk=True, store_dtype="float16")
    assert stored.disk_bytes == sum(cached.values()) // 2
    gm.fit(x, store=tmp_path / "s", store_dtype="float16", progress=False)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "s").glob("*.npy"))
    assert stored.disk_bytes <= on_disk <= stored.disk_bytes + 4096  # .npy headers


def test_a_fitted_gapa_plans_without_an_example(tmp_path):
    model, x = mlp([3, 24, 40, 1], seed=0), torch.randn(500, 3)
    gm = gapa.GAPA(model, layers=["1", "3"], m=64)
    with pytest.raises(gapa.InputError, match="example"):
        gm.plan(10**6)
    gm.fit(x, progress=False)
    assert gm.plan(10**6, on_disk=True) == gm.plan(10**6, x[:4], on_disk=True)
    loaded = gapa.GAPA.load(gm.save(tmp_path / "s.gapa"), model)
    assert loaded.plan(10**6) == gm.plan(10**6)
    refit = gapa.GAPA(model, layers=["1", "3"], m=64).fit(x, store=tmp_path / "store",
                                                          progress=False)
    again = gapa.GAPA(model, layers=["1", "3"], m=64).fit(None, store=tmp_path / "store",
                                                          progress=False)
    assert again.plan(10**6) == refit.plan(10**6) == gm.plan(10**6)


def test_plan_counts_feature_map_positions():
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 8 * 8, 2)).eval()
    x = torch.randn(2, 1, 8, 8)
    positions = gapa.GAPA(model, m=None).plan(1000, x).sites[0]
    assert (positions.width, positions.cache_rows) == (6, 1000 * 64)
    inputs = gapa.GAPA(model, m=None, queries="per_input").plan(1000, x).sites[0]
    assert (inputs.width, inputs.cache_rows) == (6 * 64, 1000)


def test_approximate_back_end_is_planned_by_size():
    model = mlp([3, 16, 1])
    gm = gapa.GAPA(model, m=None, search="auto")
    assert gm.plan(1000, torch.randn(2, 3)).sites[0].search == "exact (torch or faiss)"
    big = gm.plan(10**6, torch.randn(2, 3)).sites[0]
    assert big.search.startswith("ivf") and big.index_bytes > 10**6 * 16 * 4
    assert big.query_flops < 10**6 * 16  # far fewer rows visited than exact search


def test_fit_refuses_a_plan_over_budget_before_caching():
    model, x = mlp([3, 64, 1]), torch.randn(5000, 3)
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(len(args[0])))
    with pytest.raises(gapa.errors.MemoryBudgetError, match=r"over the budget of 1\.0 MiB.*store=DIR"):
        gapa.GAPA(model).fit(DataLoader(TensorDataset(x), batch_size=500), memory_budget="1MiB",
                             progress=False)
    assert calls == [500]  # one forward pass on the example batch, nothing cached
    gm = gapa.GAPA(model).fit(x, memory_budget="64MiB", progress=False)
    assert gm.sites["1"].cache_size == len(x)


def test_budget_needs_sized_data():
    model, x = mlp([3, 8, 1]), torch.randn(100, 3)
    with pytest.raises(gapa.InputError, match="known size"):
        gapa.GAPA(model).fit((b for b in x.split(10)), memory_budget="1GiB", progress=False)


def test_cli_plan(capsys):
    assert main(["plan", "--n-train", "2000000", "--width", "64,256", "--on-disk",
                 "--store-dtype", "float16", "--budget", "4GiB"]) == 0
    out = capsys.readouterr().out
    assert "2,000,000" in out and "within the budget" in out
    assert main(["plan", "--n-train", "2000000", "--width", "512", "--m", "all",
                 "--budget", "4GiB"]) == 1
    assert "MemoryBudgetError" in capsys.readouterr().err


@pytest.mark.parametrize(("n_train", "sites", "config", "kw", "match"), [
    (0, {"a": (16, 1)}, {}, {}, "n_train"),
    (True, {"a": (16, 1)}, {}, {}, "n_train"),
    (10.0, {"a": (16, 1)}, {}, {}, "n_train"),
    (100, {}, {}, {}, "at least one call site"),
    (100, {"a": (0, 1)}, {}, {}, r"site 'a'.*\(0, 1\)"),
    (100, {"a": (16, -2)}, {}, {}, r"site 'a'"),
    (100, {"a": (16,)}, {}, {}, r"site 'a'"),
    (100, {"a": (16.5, 1)}, {}, {}, r"site 'a'"),
    (100, {"a": (16, 1)}, {"k": 0}, {}, "k must be a positive integer"),
    (100, {"a": (16, 1)}, {"m": -3}, {}, "m must be a positive integer"),
    (100, {"a": (16, 1)}, {"k": 5, "m": 3}, {}, "k=5 neighbours exceed the 3 conditioning"),
    (100, {"a": (16, 1)}, {"k": 101, "m": None}, {}, "exceed the 100 conditioning rows"),
    (100, {"a": (16, 1)}, {}, {"store_dtype": "float64"}, "store_dtype"),
    (100, {"a": (16, 1)}, {}, {"compute_dtype": "int8"}, "compute_dtype"),
    (100, {"a": (16, 1)}, None, {}, "GPConfig"),
])
def test_plan_fit_refuses_impossible_values(n_train, sites, config, kw, match):
    with pytest.raises(gapa.ConfigurationError, match=match):  # from GPConfig or plan_fit
        plan_fit(n_train, sites, {"k": 1} if config is None else GPConfig(**config), **kw)


def test_plan_fit_takes_the_edge_values():
    assert plan_fit(1, {"a": (1, 1)}, GPConfig(k=1, m=1)).sites[0].conditioning_rows == 1
    assert plan_fit(10, {"a": (4, 3)}, GPConfig(k=30, m=None)).sites[0].cache_rows == 30
    exact = GPConfig(k=50, m=None, conditioning=Conditioning.EXACT)  # k is unused there
    assert plan_fit(10, {"a": (4, 1)}, exact).sites[0].search == "exact conditioning"


def test_gm_plan_refuses_more_neighbours_than_rows():
    model = mlp([3, 8, 1])
    with pytest.raises(gapa.ConfigurationError, match="k=5 neighbours exceed the 4"):
        gapa.GAPA(model, k=5, m=None).plan(4, torch.randn(2, 3))


def test_a_fit_beyond_the_machine_memory_is_refused_with_the_plan(monkeypatch):
    """Without a budget the machine's own memory is one: the fit stops after its first batch,
    with the numbers, instead of being killed by the system; the GAPA stays as it was."""
    import gapa.core

    model = mlp([3, 64, 1])
    x = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0))
    gm = gapa.GAPA(model, m=None)
    monkeypatch.setattr(gapa.core, "machine_memory", lambda device: 100_000)
    with pytest.raises(gapa.errors.MemoryBudgetError, match=r"over the cpu memory of this machine"):
        gm.fit(x, batch_size=100)
    assert not gm.is_fitted
    gm.fit([x[:100], x[100:]])  # unknown size: nothing to plan against, the fit goes on
    assert gm.is_fitted
    monkeypatch.setattr(gapa.core, "machine_memory", lambda device: 10**12)
    gm.fit(x, batch_size=100)


def test_token_ids_are_fitted_in_batches_of_bounded_tokens(monkeypatch):
    import gapa.core
    from gapa.core import BATCH_SIZE, FIT_TOKENS, fit_batch_size

    ids = torch.zeros(5000, 128, dtype=torch.long)
    assert fit_batch_size(ids, None) == FIT_TOKENS // 128
    assert fit_batch_size(ids, 7) == 7  # a batch size the user gives is kept
    assert fit_batch_size(torch.zeros(5000, 3), None) == BATCH_SIZE
    assert fit_batch_size(torch.zeros(2, 10**6, dtype=torch.long), None) == 1
    monkeypatch.setattr(gapa.core, "FIT_TOKENS", 80)  # 10 sequences of 8 tokens per pass
    model = nn.Sequential(nn.Embedding(100, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    sizes = []
    model[0].register_forward_pre_hook(lambda mod, args: sizes.append(len(args[0])))
    gapa.GAPA(model, ["1"], m=None).fit(torch.randint(0, 100, (40, 8)))
    assert sizes == [10, 10, 10, 10]
