"""fit(store=...): the cache streamed to disk, GPs built from it, interrupted captures resumed."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gapa
import gapa.capture.store
from gapa.capture.store import LOCK, MANIFEST, STORE_FORMAT, ActivationStore
from helpers import mlp


def _data(n=900, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _store(tmp_path, name="store", **kw):
    kw.setdefault("shard_rows", 128)
    return ActivationStore(tmp_path / name, **kw)


def _loader(x, batch_size=50):
    return DataLoader(TensorDataset(x), batch_size=batch_size)


def _signature(tmp_path, name="store") -> dict:
    return json.loads((tmp_path / name / MANIFEST).read_text())["signature"]


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
    with _store(tmp_path) as store:
        store.open(_signature(tmp_path))
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
    with pytest.raises(gapa.errors.StoreMismatchError, match="its order"):
        gapa.GAPA(model).fit(_loader(shuffled), store=_store(tmp_path), progress=False)
    with pytest.raises(gapa.errors.StoreMismatchError, match="data ended inside shard"):
        gapa.GAPA(model).fit(_loader(x[:20]), store=_store(tmp_path), progress=False)


def test_store_refuses_other_model_layers_or_dtype(tmp_path):
    model, x = mlp([3, 16, 16, 1], seed=1), _data(200)
    gapa.GAPA(model, layers=["1"]).fit(x, store=_store(tmp_path), progress=False)
    with pytest.raises(gapa.errors.StoreMismatchError, match="model"):
        gapa.GAPA(mlp([3, 16, 16, 1], seed=2), layers=["1"]).fit(
            x, store=_store(tmp_path), progress=False)
    with pytest.raises(gapa.errors.StoreMismatchError, match="layers"):
        gapa.GAPA(model, layers=["3"]).fit(x, store=_store(tmp_path), progress=False)
    with pytest.raises(gapa.errors.StoreMismatchError, match="dtype"):
        gapa.GAPA(model, layers=["1"]).fit(x, store=_store(tmp_path, dtype="float16"),
                                           progress=False)
    (tmp_path / "store" / MANIFEST).write_text("{not json")
    with pytest.raises(gapa.errors.CorruptStoreError, match=r"manifest\.json is unreadable"):
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


# --- the lock -----------------------------------------------------------------------------------


def _lock_owner(tmp_path) -> dict:
    return json.loads((tmp_path / "store" / LOCK).read_text())


def test_a_second_store_object_is_locked_out_until_the_first_closes(tmp_path):
    first, second = _store(tmp_path), _store(tmp_path)
    first.open({"model": "a"})
    assert _lock_owner(tmp_path)["pid"] == os.getpid()
    with pytest.raises(gapa.errors.StoreLockedError, match="this process") as err:
        second.open({"model": "a"})
    assert str(tmp_path / "store" / LOCK) in str(err.value)
    second.close()  # holds nothing: leaves the first one's lock alone
    assert (tmp_path / "store" / LOCK).exists()
    first.close()
    first.close()  # idempotent
    assert not (tmp_path / "store" / LOCK).exists()
    with second as store:
        assert store.open({"model": "a"}) == []
        first.close()  # not the holder: does not release the second one's lock
        assert (tmp_path / "store" / LOCK).exists()
    assert not (tmp_path / "store" / LOCK).exists()


def test_finish_keeps_the_lock(tmp_path):
    with _store(tmp_path) as store:
        store.open({"model": "a"})
        store.write_shard({"1": torch.ones(3, 2)}, batches=1, inputs=3, digest="d")
        store.finish((2,))
        assert (tmp_path / "store" / LOCK).exists()
    assert not (tmp_path / "store" / LOCK).exists()


def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tmp_path):
    (tmp_path / "store").mkdir()
    lock, leftover = tmp_path / "store" / LOCK, tmp_path / "store" / "tmpx.tmp"
    leftover.write_text("a live writer's temporary")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(gapa.errors.StoreLockedError, match="still running") as err:
            _store(tmp_path).open({"model": "a"})
        assert str(lock) in str(err.value) and str(other.pid) in str(err.value)
        assert leftover.exists() and not (tmp_path / "store" / MANIFEST).exists()
    finally:
        other.kill()
        other.wait()  # reaped: its pid no longer exists
    with _store(tmp_path) as store, pytest.warns(UserWarning, match=f"stale lock.*{other.pid}"):
        store.open({"model": "a"})
        assert _lock_owner(tmp_path)["pid"] == os.getpid()
    assert not lock.exists() and not leftover.exists()


@pytest.mark.parametrize("content, match", [
    (json.dumps({"pid": 1, "host": "another-host.example"}), "another host"),
    ("", "does not name its owner"),
    ("{\"pid\": -4}", "does not name its owner"),
])
def test_a_lock_that_cannot_be_checked_is_refused(tmp_path, content, match):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / LOCK).write_text(content)
    with pytest.raises(gapa.errors.StoreLockedError, match=match) as err:
        _store(tmp_path).open({"model": "a"})
    assert str(tmp_path / "store" / LOCK) in str(err.value)
    assert (tmp_path / "store" / LOCK).read_text() == content  # never removed


def test_leftover_temporaries_are_removed_on_open(tmp_path):
    rows = _written(tmp_path)
    leftover = tmp_path / "store" / "tmpk1ll3d.tmp"
    leftover.write_bytes(b"half a shard")
    with _store(tmp_path) as store:
        store.open(_signature(tmp_path))
    assert not leftover.exists()
    assert torch.equal(_read(tmp_path), rows)


def test_fit_releases_the_store_lock(tmp_path):
    """Needs fit to close the store it opened, on success and on error."""
    model, x = mlp([3, 16, 1], seed=1), _data()
    _interrupted_capture(model, x, tmp_path)
    assert not (tmp_path / "store" / LOCK).exists()
    gapa.GAPA(model).fit(x, store=tmp_path / "store", progress=False)
    assert not (tmp_path / "store" / LOCK).exists()
    gapa.GAPA(model).fit(None, store=tmp_path / "store", progress=False)
    assert not (tmp_path / "store" / LOCK).exists()


# --- checked shards and manifests ---------------------------------------------------------------


def _captured(tmp_path, n=300):
    """A finished store of site '1' in ``tmp_path/store``, three shards of 100 rows, closed."""
    model, x = mlp([3, 16, 1], seed=1), _data(n)
    with _store(tmp_path, shard_rows=100) as store:
        gapa.GAPA(model, m=None).fit(x, store=store, batch_size=100, progress=False)
    return model, x


def _written(tmp_path) -> torch.Tensor:
    """A finished store written directly (no model): site '1', three shards of 100 x 16 rows,
    closed; returns its rows."""
    rows = _data(300, 16, seed=3)
    with _store(tmp_path) as store:
        store.open({"model": "m"})
        for part in rows.split(100):
            store.write_shard({"1": part}, batches=1, inputs=100, digest="d")
        store.finish((3,))
    return rows


def _read(tmp_path) -> torch.Tensor:
    with _store(tmp_path) as store:
        store.open(_signature(tmp_path))
        return store.rows("1").materialize()


def _manifest(tmp_path) -> dict:
    return json.loads((tmp_path / "store" / MANIFEST).read_text())


def _first_shard(tmp_path):
    return tmp_path / "store" / _manifest(tmp_path)["shards"][0]["sites"]["1"]["file"]


def test_a_correct_store_records_its_shards_and_refits_to_the_same_rows(tmp_path):
    model, _ = _captured(tmp_path)
    manifest = _manifest(tmp_path)
    assert manifest["format"] == STORE_FORMAT == 2 and len(manifest["shards"]) == 3
    for shard in manifest["shards"]:
        site = shard["sites"]["1"]
        data = (tmp_path / "store" / site["file"]).read_bytes()
        assert (site["rows"], site["width"], site["dtype"]) == (100, 16, "float32")
        assert site["bytes"] == len(data)
        assert site["sha256"] == hashlib.sha256(data).hexdigest()
    refit = gapa.GAPA(model, m=None).fit(None, store=_store(tmp_path), progress=False)
    memory = gapa.GAPA(model, m=None).fit(_data(300), progress=False)
    assert torch.equal(refit.sites["1"].rows, memory.sites["1"].rows)


def test_each_shard_is_hashed_once_per_read_object(tmp_path, monkeypatch):
    _written(tmp_path)
    calls = []
    verify = gapa.capture.store.verify_shard
    monkeypatch.setattr(gapa.capture.store, "verify_shard", lambda *a: calls.append(a) or verify(*a))
    with _store(tmp_path) as store:
        store.open(_signature(tmp_path))
        rows = store.rows("1")
        full = rows.materialize()
        for seed in range(4):
            idx = torch.randperm(300, generator=torch.Generator().manual_seed(seed))[:50]
            assert torch.equal(rows[idx], full[idx])
    assert len(calls) == 3


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:-64])


def _other_dtype(path):  # the same byte size: float16 (200, 16) for float32 (100, 16)
    np.save(path, np.zeros((200, 16), np.float16))


def _other_shape(path):  # the same byte size: (50, 32) for (100, 16)
    np.save(path, np.load(path).reshape(50, 32))


@pytest.mark.parametrize("damage, match", [
    (_flip_last_byte, "SHA-256.*modified"),
    (_truncate, "bytes.*truncated"),
    (_other_dtype, r"holds float16 \(200, 16\).*float32 \(100, 16\)"),
    (_other_shape, r"holds float32 \(50, 32\).*float32 \(100, 16\)"),
    (os.remove, "is missing"),
])
def test_a_damaged_shard_is_refused_naming_the_file(tmp_path, damage, match):
    _written(tmp_path)
    shard = _first_shard(tmp_path)
    size = shard.stat().st_size
    damage(shard)
    if damage in (_other_dtype, _other_shape):
        assert shard.stat().st_size == size  # only the header tells
    with pytest.raises(gapa.errors.CorruptStoreError, match=match) as err:
        _read(tmp_path)
    assert str(shard) in str(err.value)


def test_the_fit_refuses_a_modified_shard(tmp_path):
    model, _ = _captured(tmp_path)
    shard = _first_shard(tmp_path)
    _flip_last_byte(shard)
    with pytest.raises(gapa.errors.CorruptStoreError, match="SHA-256") as err:
        gapa.GAPA(model, m=None).fit(None, store=_store(tmp_path), progress=False)
    assert str(shard) in str(err.value)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_shard_outside_the_store_is_refused(tmp_path, where):
    _written(tmp_path)
    outside = tmp_path / "outside.npy"
    outside.write_bytes(_first_shard(tmp_path).read_bytes())  # a valid copy: same size and hash
    name = "../outside.npy" if where == "parent" else str(outside)
    manifest = _manifest(tmp_path)
    manifest["shards"][0]["sites"]["1"]["file"] = name
    (tmp_path / "store" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(gapa.errors.CorruptStoreError, match="not a plain file name") as err:
        _read(tmp_path)
    assert repr(name) in str(err.value) and str(tmp_path / "store" / MANIFEST) in str(err.value)


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_a_shard_linked_outside_the_store_is_refused(tmp_path):
    _written(tmp_path)
    shard, outside = _first_shard(tmp_path), tmp_path / "outside.npy"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(gapa.errors.CorruptStoreError, match="outside the store") as err:
        _read(tmp_path)
    assert str(shard) in str(err.value)


def test_a_complete_manifest_without_shards_is_corrupt_not_unused_layers(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / MANIFEST).write_text(json.dumps(
        {"format": STORE_FORMAT, "dtype": "float32", "signature": {}, "shards": [],
         "complete": True, "input_shape": [3]}))
    with pytest.raises(gapa.errors.CorruptStoreError, match="marked complete but lists no shards") as err:
        gapa.GAPA(mlp([3, 16, 1], seed=1)).fit(None, store=_store(tmp_path), progress=False)
    assert str(tmp_path / "store" / MANIFEST) in str(err.value)
    assert not (tmp_path / "store" / LOCK).exists()  # a failed open releases its lock


def _set(path, value):
    """A manifest edit: set ``value`` at the keys ``path`` (``...`` deletes the last key)."""
    def edit(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        if value is ...:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return manifest
    return edit


@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: [m], id="not-an-object"),
    pytest.param(_set(["shards"], {"0": 1}), id="shards-not-a-list"),
    pytest.param(_set(["complete"], "yes"), id="complete-not-bool"),
    pytest.param(_set(["dtype"], "int8"), id="store-dtype"),
    pytest.param(_set(["signature"], None), id="no-signature"),
    pytest.param(_set(["input_shape"], [3, -1]), id="negative-input-shape"),
    pytest.param(_set(["input_ids"], 1), id="input-ids-not-bool"),
    pytest.param(_set(["shards", 0, "inputs"], -100), id="negative-inputs"),
    pytest.param(_set(["shards", 1, "batches"], True), id="bool-batches"),
    pytest.param(_set(["shards", 0, "sites"], ["1"]), id="sites-not-an-object"),
    pytest.param(_set(["shards", 0, "sites", "1", "rows"], -1), id="negative-rows"),
    pytest.param(_set(["shards", 0, "sites", "1", "width"], "16"), id="width-a-string"),
    pytest.param(_set(["shards", 0, "sites", "1", "bytes"], 1.5), id="bytes-a-float"),
    pytest.param(_set(["shards", 0, "sites", "1", "dtype"], "int64"), id="rows-dtype"),
    pytest.param(_set(["shards", 0, "sites", "1", "sha256"], ...), id="no-sha256"),
    pytest.param(_set(["shards", 2, "sites", "1", "width"], 15), id="inconsistent-width"),
])
def test_a_malformed_manifest_is_refused_naming_it(tmp_path, edit):
    _written(tmp_path)
    signature = _signature(tmp_path)
    path = tmp_path / "store" / MANIFEST
    path.write_text(json.dumps(edit(_manifest(tmp_path))))
    with pytest.raises(gapa.errors.CorruptStoreError, match="malformed") as err:
        _store(tmp_path).open(signature)
    assert str(path) in str(err.value)
    assert not (tmp_path / "store" / LOCK).exists()


def test_a_store_of_the_older_format_must_be_captured_again(tmp_path):
    _written(tmp_path)
    manifest = _manifest(tmp_path)
    manifest["format"] = 1
    for shard in manifest["shards"]:
        for site in shard["sites"].values():
            del site["bytes"], site["sha256"]
    (tmp_path / "store" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(gapa.errors.StoreMismatchError, match=r"format 1.*delete the store") as err:
        _read(tmp_path)
    assert str(tmp_path / "store" / MANIFEST) in str(err.value)
