"""fit(store=...): the cache streamed to disk, GPs built from it, interrupted captures resumed."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gapa
from conftest import mlp
from gapa.store import MANIFEST, ActivationStore


def _data(n=900, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _store(tmp_path, name="store", **kw):
    kw.setdefault("shard_rows", 128)
    return ActivationStore(tmp_path / name, **kw)


def _loader(x, batch_size=50):
    return DataLoader(TensorDataset(x), batch_size=batch_size)


class Interrupted(Exception):
    pass


def _interrupting(loader, after: int):
    """The batches of ``loader``, then an exception after ``after`` of them (a killed job)."""
    for i, batch in enumerate(loader):
        if i == after:
            raise Interrupted
        yield batch


def _interrupted_capture(model, x, tmp_path) -> None:
    """A capture into ``tmp_path/store`` killed after 9 batches of 50."""
    with pytest.raises(Interrupted):
        gapa.GAPA(model).fit(_interrupting(_loader(x), after=9), store=_store(tmp_path),
                             progress=False)


@pytest.mark.parametrize("m", [None, 64])
def test_store_fit_equals_memory_fit(tmp_path, m):
    model, x = mlp([3, 16, 16, 1], seed=1), _data()
    options = {"layers": ["1", "3"], "m": m}
    memory = gapa.GAPA(model, **options).fit(_loader(x), progress=False)
    stored = gapa.GAPA(model, **options).fit(_loader(x), store=_store(tmp_path), progress=False)
    store = _store(tmp_path)
    store.open(json.loads((tmp_path / "store" / MANIFEST).read_text())["signature"])
    assert len(store.manifest["shards"]) > 3  # really several shards
    q = _data(40, seed=5)
    a, b = memory(q), stored(q)
    assert torch.equal(a.mean, b.mean)
    assert torch.equal(a.var, b.var)
    for key, site in memory.sites.items():
        assert stored.sites[key].cache_size == site.cache_size == len(x)


def test_float16_store_is_close_and_keeps_the_mean(tmp_path):
    model, x = mlp([3, 16, 1], seed=1), _data()
    memory = gapa.GAPA(model, m=None).fit(x, progress=False)
    half = gapa.GAPA(model, m=None).fit(x, store=_store(tmp_path, dtype="float16"),
                                        progress=False)
    q = _data(40, seed=5)
    a, b = memory(q), half(q)
    with torch.no_grad():
        assert torch.equal(b.mean, model(q))
    assert next(iter(half.sites.values())).rows.dtype == torch.float32
    torch.testing.assert_close(b.var, a.var, rtol=0.05, atol=1e-4)


def test_stored_rows_gather_in_any_order(tmp_path):
    model, x = mlp([3, 16, 1], seed=1), _data()
    gm = gapa.GAPA(model, m=None)
    store = _store(tmp_path, shard_rows=100)
    gm.fit(x, store=store, batch_size=60, progress=False)
    rows = store.rows("1")
    full = rows.materialize()
    assert full.shape == (len(x), 16) and len(rows.paths) > 5
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:300]
    assert torch.equal(rows[idx], full[idx])
    assert torch.equal(torch.cat(list(rows.chunks())), full)


def test_interrupted_capture_resumes_without_recomputing(tmp_path):
    model, x = mlp([3, 16, 16, 1], seed=1), _data()
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    options = {"layers": ["1", "3"], "m": 64}
    with pytest.raises(Interrupted):
        gapa.GAPA(model, **options).fit(_interrupting(_loader(x), after=11),
                                        store=_store(tmp_path), progress=False)
    manifest = json.loads((tmp_path / "store" / MANIFEST).read_text())
    finished = sum(s["batches"] for s in manifest["shards"])
    assert not manifest["complete"] and 0 < finished <= 11
    calls.clear()
    resumed = gapa.GAPA(model, **options).fit(_loader(x), store=_store(tmp_path), progress=False)
    assert len(calls) == 18 - finished  # only the unfinished batches ran the model
    fresh = gapa.GAPA(model, **options).fit(_loader(x), store=_store(tmp_path, "fresh"),
                                            progress=False)
    q = _data(40, seed=5)
    assert torch.equal(resumed(q).var, fresh(q).var)
    # a finished store refits without the data, and without running the model
    calls.clear()
    again = gapa.GAPA(model, **options).fit(None, store=_store(tmp_path), progress=False)
    assert calls == [] and torch.equal(again(q).var, fresh(q).var)


def test_resume_refuses_other_data_order(tmp_path):
    model, x = mlp([3, 16, 1], seed=1), _data()
    _interrupted_capture(model, x, tmp_path)
    shuffled = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))]
    with pytest.raises(gapa.StoreMismatchError, match="its order"):
        gapa.GAPA(model).fit(_loader(shuffled), store=_store(tmp_path), progress=False)
    with pytest.raises(gapa.StoreMismatchError, match="data ended inside shard"):
        gapa.GAPA(model).fit(_loader(x[:20]), store=_store(tmp_path), progress=False)


def test_store_refuses_other_model_layers_or_dtype(tmp_path):
    model, x = mlp([3, 16, 16, 1], seed=1), _data(200)
    gapa.GAPA(model, layers=["1"]).fit(x, store=_store(tmp_path), progress=False)
    with pytest.raises(gapa.StoreMismatchError, match="model"):
        gapa.GAPA(mlp([3, 16, 16, 1], seed=2), layers=["1"]).fit(
            x, store=_store(tmp_path), progress=False)
    with pytest.raises(gapa.StoreMismatchError, match="layers"):
        gapa.GAPA(model, layers=["3"]).fit(x, store=_store(tmp_path), progress=False)
    with pytest.raises(gapa.StoreMismatchError, match="dtype"):
        gapa.GAPA(model, layers=["1"]).fit(x, store=_store(tmp_path, dtype="float16"),
                                           progress=False)
    (tmp_path / "store" / MANIFEST).write_text("{not json")
    with pytest.raises(gapa.StoreMismatchError, match="unreadable"):
        gapa.GAPA(model, layers=["1"]).fit(x, store=_store(tmp_path), progress=False)


def test_incomplete_store_needs_data(tmp_path):
    model, x = mlp([3, 16, 1], seed=1), _data()
    _interrupted_capture(model, x, tmp_path)
    with pytest.raises(gapa.InputError, match="not complete"):
        gapa.GAPA(model).fit(None, store=_store(tmp_path), progress=False)
    with pytest.raises(gapa.InputError, match="training inputs"):
        gapa.GAPA(model).fit(None, progress=False)


def test_store_refuses_non_finite_activations(tmp_path):
    model, x = mlp([3, 16, 1], seed=1), _data(200)
    with torch.no_grad():
        model[0].weight[3, 0] = float("inf")
    with pytest.raises(gapa.NonFiniteError, match="'1'"):
        gapa.GAPA(model).fit(x, store=_store(tmp_path), progress=False)


def test_bad_store_options(tmp_path):
    with pytest.raises(gapa.ConfigurationError, match="float16"):
        ActivationStore(tmp_path, dtype="int8")
    with pytest.raises(gapa.ConfigurationError, match="shard_rows"):
        ActivationStore(tmp_path, shard_rows=0)


def test_kmeans_from_a_store_trains_on_a_sample_and_counts_every_row(tmp_path):
    model, x = mlp([3, 16, 1], seed=1), _data(2000)
    gm = gapa.GAPA(model, m=8).fit(x, store=_store(tmp_path), progress=False)  # 8 x 64 < 2000
    site = gm.sites["1"]
    assert site.n_conditioning <= 8 and int(site.counts.sum()) == len(x)
    memory = gapa.GAPA(model, m=8).fit(x, progress=False).sites["1"]
    # a different sample, the same clusters to within a few rows each
    assert sorted(site.counts.tolist()) == pytest.approx(sorted(memory.counts.tolist()), abs=60)


def test_float16_overflow_is_refused(tmp_path):
    model, x = mlp([3, 16, 1], seed=1), _data(200)
    with pytest.raises(gapa.NonFiniteError, match="float16"):
        gapa.GAPA(model).fit(x * 1e5, store=_store(tmp_path, dtype="float16"), progress=False)


def test_integer_inputs_store_the_activations_dtype(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Flatten(),
                                torch.nn.Linear(32, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1)).eval()
    tokens = torch.randint(0, 50, (600, 4), generator=torch.Generator().manual_seed(0))
    stored = gapa.GAPA(model, m=16).fit(tokens, store=_store(tmp_path), progress=False)
    memory = gapa.GAPA(model, m=16).fit(tokens, progress=False)
    assert stored.sites["3"].rows.dtype == torch.float32
    q = tokens[:20]
    torch.testing.assert_close(stored(q).var, memory(q).var)


def test_resume_with_another_batch_size_gives_the_same_cache(tmp_path):
    model, x = mlp([3, 16, 1], seed=1), _data()
    _interrupted_capture(model, x, tmp_path)  # shards of 128 rows from batches of 50
    shards = json.loads((tmp_path / "store" / MANIFEST).read_text())["shards"]
    finished = sum(s["inputs"] for s in shards)
    assert finished % 77 and finished % 50 == 0  # a batch of 77 straddles the last shard's end
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    resumed = gapa.GAPA(model, m=None).fit(_loader(x, batch_size=77), store=_store(tmp_path),
                                           progress=False)
    assert sum(calls) == len(x) - finished  # only the rows after the finished shards ran
    fresh = gapa.GAPA(model, m=None).fit(x, progress=False)
    assert torch.equal(resumed.sites["1"].rows, fresh.sites["1"].rows)
