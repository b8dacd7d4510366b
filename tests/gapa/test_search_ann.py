"""Approximate faiss back ends: measured recall, row numbering, AUTO, memmap input, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gapa.errors import ConfigurationError, InputError, MissingDependencyError
from gapa.gp import search
from gapa.gp.search import RECALL_TARGET, NeighbourIndex, SearchBackend

faiss = pytest.importorskip("faiss")

N, D, CLUSTERS = 12_000, 32, 50


def mixture(n: int, seed: int, d: int = D) -> np.ndarray:
    """Rows of a fixed Gaussian mixture (float32); ``seed`` picks the draws, not the centres."""
    centres = np.random.default_rng(0).normal(size=(CLUSTERS, d)) * 3
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, CLUSTERS, n)] + rng.normal(size=(n, d))).astype(np.float32)


def exact(points: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    return NeighbourIndex(points).search(queries, k)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return (found[:, :, None] == truth[:, None, :]).any(2).float().mean().item()


@pytest.fixture(scope="module")
def points() -> torch.Tensor:
    return torch.from_numpy(mixture(N, seed=1))


@pytest.fixture(scope="module")
def fresh() -> torch.Tensor:
    return torch.from_numpy(mixture(1000, seed=2))


@pytest.fixture(scope="module")
def built(points):
    """Each (backend, k) index is built once per module: the builds dominate the run time."""
    cache: dict = {}

    def get(backend: str, k: int) -> NeighbourIndex:
        if (backend, k) not in cache:
            cache[backend, k] = NeighbourIndex(points, backend, k=k)
        return cache[backend, k]

    return get


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_approximate_recall_reaches_target(built, points, fresh, backend, k):
    index = built(backend, k)
    assert index.backend is SearchBackend(backend)
    assert index.recall >= RECALL_TARGET
    assert index.held_out and index.recall_queries == search.HELD_OUT_ROWS
    assert set(index.params) == ({"nlist", "nprobe"} if backend == "ivf" else {"efSearch"})
    assert f"recall@{k}" in index.describe() and "held-out" in index.describe()
    found = index.search(fresh, k)
    assert found.dtype == torch.long and found.shape == (len(fresh), k)
    # Measured independently, on queries the index never saw, against torch exact search.
    assert recall(found, exact(points, fresh, k)) >= RECALL_TARGET - 0.05


def test_ivf_tuning_raises_nprobe_with_the_target(points):
    small = points[:3000]
    low = NeighbourIndex(small, "ivf", recall_target=0.3)
    high = NeighbourIndex(small, "ivf", recall_target=1.0)
    assert low.params["nprobe"] < high.params["nprobe"]
    assert low.recall < high.recall and high.recall == 1.0


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_search_returns_original_row_numbers(built, points, backend):
    # Every row, held-out ones included: those are added after tuning (last, for HNSW) and are
    # 1000 / 12000 = 8% of the rows, so misnumbering them alone would leave at most 92% here.
    found = built(backend, 1).search(points, 1)[:, 0]
    assert (found == torch.arange(N)).float().mean().item() >= 0.97


def test_exact_faiss_matches_torch_with_chunked_adds(points, fresh, monkeypatch):
    monkeypatch.setattr(search, "ADD_CHUNK_ROWS", 3000)
    index = NeighbourIndex(points, "faiss")
    assert (index.recall, index.params, index.describe()) == (1.0, {}, "faiss (exact)")
    assert recall(index.search(fresh, 5), exact(points, fresh, 5)) >= 0.999


def test_small_cache_measures_recall_on_indexed_rows():
    x = torch.from_numpy(mixture(800, seed=3))
    index = NeighbourIndex(x, "hnsw", k=3)
    assert not index.held_out and index.recall_queries == 800
    assert "indexed rows" in index.describe() and index.recall >= RECALL_TARGET
    assert torch.equal(index.search(x[:50], 1)[:, 0], torch.arange(50))


def test_auto_resolves_by_row_count(monkeypatch):
    monkeypatch.setattr(search, "AUTO_EXACT_MAX_ROWS", 1000)
    small = NeighbourIndex(torch.from_numpy(mixture(1000, seed=4)), "auto")
    assert small.backend is SearchBackend.EXACT and small.recall == 1.0
    large = NeighbourIndex(torch.from_numpy(mixture(2500, seed=4)), SearchBackend.AUTO)
    assert large.backend is SearchBackend.IVF and large.state()["backend"] == "ivf"
    assert large.recall >= RECALL_TARGET


@pytest.fixture
def memmap16(tmp_path) -> np.memmap:
    path = tmp_path / "cache.f16"
    data = mixture(6000, seed=5).astype(np.float16)
    data.tofile(path)
    return np.memmap(path, dtype=np.float16, mode="r", shape=data.shape)


def test_float16_memmap_ivf(memmap16, monkeypatch):
    monkeypatch.setattr(search, "ADD_CHUNK_ROWS", 1024)  # several chunks on a small cache
    index = NeighbourIndex(memmap16, "ivf", k=5)
    assert index.points is memmap16 and len(index) == len(memmap16)
    assert index.recall >= RECALL_TARGET
    rows = torch.arange(0, len(memmap16), 7)
    queries = torch.from_numpy(np.asarray(memmap16[rows.numpy()], dtype=np.float32))
    found = index.search(queries, 5)
    assert (found[:, 0] == rows).float().mean().item() >= 0.97
    truth = exact(torch.from_numpy(np.asarray(memmap16, dtype=np.float32)), queries, 5)
    assert recall(found, truth) >= RECALL_TARGET - 0.05


def test_float16_memmap_torch(memmap16):
    index = NeighbourIndex(memmap16, "torch")
    assert isinstance(index.points, torch.Tensor) and index.points.dtype == torch.float16
    rows = torch.arange(0, len(memmap16), 7)
    queries = index.points[rows].float()  # float32 queries on float16 points
    found = index.search(queries, 1)
    assert found.dtype == torch.long
    assert (found[:, 0] == rows).float().mean().item() >= 0.97


def split_state(state: dict) -> tuple[str, dict]:
    """What a caller saves: JSON for the scalars, arrays (safetensors) for the rest."""
    arrays = {k: v for k, v in state.items() if k.endswith("_bytes") or k == "ids"}
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    return json.dumps({k: v for k, v in state.items() if k not in arrays}), arrays


@pytest.mark.parametrize("backend", ["torch", "faiss", "ivf", "hnsw"])
def test_state_round_trip_gives_identical_search(built, points, fresh, backend):
    index = built(backend, 5)
    text, arrays = split_state(index.state())
    if backend in ("ivf", "hnsw"):
        assert arrays["index_bytes"].dtype == np.uint8
        assert ("ids" in arrays) == (backend == "hnsw")
    else:
        assert arrays == {}
    again = NeighbourIndex.from_state(points, {**json.loads(text), **arrays})
    assert again.backend is index.backend
    assert (again.params, again.recall, again.describe()) == (index.params, index.recall, index.describe())
    assert torch.equal(again.search(fresh, 5), index.search(fresh, 5))
    assert torch.equal(again.search(points[:500], 1), index.search(points[:500], 1))


def test_from_state_rejects_other_points(built, points):
    with pytest.raises(InputError, match="12000 x 32"):
        NeighbourIndex.from_state(points[:100], built("ivf", 5).state())


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="GPU faiss is installed")
@pytest.mark.parametrize("backend", ["faiss", "ivf"])
def test_gpu_without_gpu_faiss_is_refused(backend):
    with pytest.raises(MissingDependencyError, match="GPU faiss"):
        NeighbourIndex(torch.randn(100, 4), backend, gpu=True)


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((torch.randn(50, 4), "annoy"), {}, ConfigurationError),
        ((torch.randn(50, 4), "ivf"), {"k": 0}, ConfigurationError),
        ((torch.randn(50, 4), "hnsw"), {"k": 51}, ConfigurationError),
        ((torch.randn(50, 4), "ivf"), {"recall_target": 0.0}, ConfigurationError),
        ((torch.randn(50, 4), "hnsw"), {"recall_target": 1.5}, ConfigurationError),
        ((torch.randn(50), "torch"), {}, InputError),
        ((np.zeros((2, 3, 4), dtype=np.float32), "ivf"), {}, InputError),
        ((np.zeros((5, 3), dtype=np.int64), "faiss"), {}, InputError),
        (([[0.0, 1.0]], "torch"), {}, InputError),
    ],
)
def test_bad_arguments_raise_typed_errors(args, kwargs, error):
    with pytest.raises(error):
        NeighbourIndex(*args, **kwargs)


def test_search_rejects_bad_k_and_width():
    index = NeighbourIndex(torch.randn(20, 4), "faiss")
    with pytest.raises(ConfigurationError):
        index.search(torch.randn(3, 4), 21)
    with pytest.raises(InputError):
        index.search(torch.randn(3, 5), 1)
