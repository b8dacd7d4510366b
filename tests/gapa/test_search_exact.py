"""The default ``exact`` search: faiss for large CPU query batches, torch otherwise, same answers."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from gapa import GAPA
from gapa.gp import search
from gapa.gp.search import FAISS_MIN_QUERY_VALUES, NeighbourIndex, SearchBackend

D = 8
needs_faiss = pytest.mark.skipif(search._faiss_if_installed() is None, reason="needs faiss")


@pytest.fixture
def faiss_calls(monkeypatch) -> list[bool]:
    """Record, for every ``search`` of an ``exact`` index, whether faiss took it."""
    calls: list[bool] = []
    decide = NeighbourIndex._faster_in_faiss

    def spy(self, queries):
        calls.append(decide(self, queries))
        return calls[-1]

    monkeypatch.setattr(NeighbourIndex, "_faster_in_faiss", spy)
    return calls


def squared_distances(points, queries, idx) -> torch.Tensor:
    return (queries[:, None, :].double() - points[idx].double()).square().sum(-1)


@needs_faiss
@pytest.mark.parametrize("k", [1, 4])
def test_large_batches_go_to_faiss_and_find_the_same_neighbours_as_torch(faiss_calls, k):
    g = torch.Generator().manual_seed(0)
    points = torch.randn(300, D, generator=g)
    index = NeighbourIndex(points, "exact")
    reference = NeighbourIndex(points, "torch")
    small = torch.randn(50, D, generator=g)
    large = torch.randn(FAISS_MIN_QUERY_VALUES // D, D, generator=g)
    for queries in (small, large):
        found, truth = index.search(queries, k), reference.search(queries, k)
        # ties aside the indices agree; the distances agree always (to float32 rounding)
        assert (found == truth).float().mean() > 0.999
        torch.testing.assert_close(squared_distances(points, queries, found),
                                   squared_distances(points, queries, truth),
                                   rtol=1e-5, atol=1e-5)
    assert faiss_calls == [False, True]


@needs_faiss
def test_float64_cuda_free_and_mapped_caches_stay_in_torch(faiss_calls, tmp_path):
    queries = torch.randn(FAISS_MIN_QUERY_VALUES // D, D, dtype=torch.float64)
    index = NeighbourIndex(torch.randn(100, D, dtype=torch.float64), "exact")
    assert index.search(queries, 1).shape == (len(queries), 1)
    mapped = np.lib.format.open_memmap(tmp_path / "rows.npy", mode="w+", dtype=np.float32,
                                       shape=(100, D))
    mapped[:] = np.random.default_rng(0).normal(size=(100, D))
    index = NeighbourIndex(mapped, "exact")
    index.search(queries.float(), 1)
    assert faiss_calls == [False, False]


def test_without_faiss_exact_is_torch(monkeypatch, faiss_calls):
    monkeypatch.setattr(search, "_faiss_if_installed", lambda: None)
    index = NeighbourIndex(torch.randn(100, D), "exact")
    index.search(torch.randn(FAISS_MIN_QUERY_VALUES // D, D), 1)
    assert faiss_calls == [False]


@needs_faiss
def test_exact_is_the_default_and_auto_below_the_row_limit():
    gm = GAPA(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert gm.config.search is SearchBackend.EXACT
    index = NeighbourIndex(torch.randn(100, D), "auto")
    assert index.backend is SearchBackend.EXACT
    rebuilt = NeighbourIndex.from_state(index.points, index.state())
    assert rebuilt.backend is SearchBackend.EXACT and rebuilt.describe() == index.describe() != "exact (torch)"


@needs_faiss
def test_a_per_pixel_gapa_gives_the_torch_variances_when_faiss_searches(faiss_calls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, D, 3, padding=1), nn.ReLU(), nn.Conv2d(D, 3, 1)).eval()
    train = torch.randn(16, 1, 16, 16)
    pixels = FAISS_MIN_QUERY_VALUES // D  # one query per pixel
    x = torch.randn(pixels // 256 + 1, 1, 16, 16)
    out = {name: GAPA(model, layers=["1"], search=name, m=64).fit(train)(x)
           for name in ("exact", "torch")}
    assert True in faiss_calls
    assert torch.equal(out["exact"].mean, out["torch"].mean)
    torch.testing.assert_close(out["exact"].var, out["torch"].var, rtol=1e-5, atol=1e-7)


@needs_faiss
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_neighbours_do_not_depend_on_the_batch_size(dtype, faiss_calls):
    g = torch.Generator().manual_seed(1)
    points = torch.randn(3000, 16, generator=g).to(dtype)
    queries = torch.randn(FAISS_MIN_QUERY_VALUES // 16, 16, generator=g).to(dtype)
    index = NeighbourIndex(points, "exact")
    whole = index.search(queries, 4)
    parts = torch.cat([index.search(q, 4) for q in queries.split(1000)])
    assert faiss_calls[0] and not any(faiss_calls[1:])
    # both kernels rank in float32: ties aside the same rows, and the same distances always
    assert (whole == parts).float().mean() > 0.999
    torch.testing.assert_close(squared_distances(points, queries, whole),
                               squared_distances(points, queries, parts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["exact", "torch",
                                     pytest.param("faiss", marks=needs_faiss),
                                     pytest.param("ivf", marks=needs_faiss)])
def test_indexes_copy_and_pickle(backend):
    g = torch.Generator().manual_seed(2)
    points = torch.randn(2500, D, generator=g)
    queries = torch.randn(FAISS_MIN_QUERY_VALUES // D, D, generator=g)
    index = NeighbourIndex(points, backend, k=2)
    for twin in (copy.deepcopy(index), pickle.loads(pickle.dumps(index))):
        assert twin.describe() == index.describe()
        assert torch.equal(twin.search(queries, 2), index.search(queries, 2))
        assert torch.equal(twin.search(queries[:7], 2), index.search(queries[:7], 2))


def test_a_fitted_default_gapa_deep_copies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    gm = GAPA(model, m=64).fit(torch.randn(300, 3))
    twin = copy.deepcopy(gm)
    x = torch.randn(40, 3)
    assert torch.equal(twin(x).var, gm(x).var)
