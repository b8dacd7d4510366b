"""Nearest-neighbour search over cached activations: exact (torch or faiss) or approximate (faiss).

Every back end returns neighbours by squared Euclidean distance. faiss searches in float32; the
variances are then computed from the stored rows in the model's own dtype. ``exact`` (GAPA's
default) picks, per call, the faster of two exact kernels: faiss's blocked one for large query
batches, torch's matrix product otherwise. The approximate back ends measure their recall
against exact search when they are built and tune their search-time parameter until it reaches
``recall_target``, so a fitted index states how good it is.
"""

from __future__ import annotations

import threading
import warnings
from enum import Enum

import numpy as np
import torch

from ..errors import ConfigurationError, InputError, MissingDependencyError, parse_enum

#: Query x row distances computed per chunk by the torch back end: a block that stays in cache
#: while argmin reads it back (2 MB in float32; twice as fast as 64 MB blocks on 8-d queries).
SEARCH_CHUNK_ELEMENTS = 1 << 19
#: Fewest queries per chunk, so that a large cache does not make the chunks one query each.
SEARCH_CHUNK_MIN_QUERIES = 256
#: The recall@k the approximate back ends are tuned to reach at fit time (measured, not assumed).
RECALL_TARGET = 0.95
#: ``auto`` searches exactly up to this many rows and with IVF above it.
AUTO_EXACT_MAX_ROWS = 100_000
#: ``exact`` hands a call to faiss when its queries hold at least this many values (queries x
#: dimensions). faiss 1.15 switches from a per-query loop to blocked BLAS (and, for k = 1 in few
#: dimensions, a fused kernel) at this size (its ``distance_compute_blas_threshold``); measured
#: on one core, faiss then took 0.03-0.95x torch's time over 512-50,000 rows of 8-576
#: dimensions, and 1.3-8x it just below (``benchmarks/search_kernels.py``).
FAISS_MIN_QUERY_VALUES = 128_000
#: Serialises the temporary change of faiss's process-wide kernel threshold (:func:`_exact_knn`).
_BLAS_THRESHOLD_LOCK = threading.Lock()
#: Rows converted to float32 and added to a faiss index at a time, so a float16 or memory-mapped
#: cache is never copied whole; faiss's own storage is the only full float32 copy.
ADD_CHUNK_ROWS = 65_536
#: Rows held out of the build to measure recall on (queries the index has not seen).
HELD_OUT_ROWS = 1000
#: Below this many rows nothing is held out: recall is measured on a sample of indexed rows.
MIN_ROWS_TO_HOLD_OUT = 2000
#: HNSW graph degree and build-time beam; the search-time beam (efSearch) is tuned.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
#: Largest efSearch tried while tuning HNSW.
HNSW_MAX_EF_SEARCH = 4096
#: faiss trains IVF centroids on at most this many rows per list (its own default cap).
IVF_TRAIN_ROWS_PER_LIST = 256


class SearchBackend(str, Enum):
    """Where the K nearest cached rows are found."""

    EXACT = "exact"
    """Exact: per call, faiss's flat search for at least ``FAISS_MIN_QUERY_VALUES`` query values
    on an in-memory CPU tensor that is not float64 (a float32 copy of it is kept, and a second
    one for torch's kernel when the cache is half precision, so that both rank in float32),
    torch otherwise and always without faiss."""
    TORCH = "torch"
    """Exact search with matrix products and ``topk``; always available, any dtype and device."""
    FAISS = "faiss"
    """Exact search with faiss ``IndexFlatL2`` (float32, CPU); needs ``pip install faiss-cpu``."""
    IVF = "ivf"
    """Approximate faiss ``IndexIVFFlat``; ``nprobe`` tuned to reach the recall target."""
    HNSW = "hnsw"
    """Approximate faiss ``IndexHNSWFlat`` graph; ``efSearch`` tuned to reach the recall target."""
    AUTO = "auto"
    """``exact`` up to ``AUTO_EXACT_MAX_ROWS`` rows, IVF above it."""


_APPROXIMATE = (SearchBackend.IVF, SearchBackend.HNSW)


class NeighbourIndex:
    """K-nearest-neighbour index over the rows of ``points`` (N x d).

    ``k`` and ``recall_target`` only matter for the approximate back ends: recall@k is measured
    on held-out rows and the search parameter raised until it reaches the target (with a
    :class:`RuntimeWarning` when the largest setting falls short).

    Parameters
    ----------
    points : Tensor or numpy.ndarray
        The rows, floating point; a read-only float16/float32 ``numpy.memmap`` works.
    backend : SearchBackend or str
        See :class:`SearchBackend`; ``auto`` is resolved here by the number of rows.
    k : int
        The neighbours the approximate back ends are tuned for.
    recall_target : float
        In (0, 1].
    seed : int
        Seeds the held-out sample and the IVF training.
    gpu : bool, optional
        Move a faiss index to the GPU; None does so when GPU faiss is installed and the points
        are on CUDA (never for HNSW).
    space : str, optional
        Names the coordinates the points are in (JSON-safe; kept in :meth:`state`), so whoever
        restores a saved index can tell one built on other coordinates and rebuild it.

    Raises
    ------
    ConfigurationError
        For an unknown back end, a ``k`` that is not a positive integer (or, for the
        approximate back ends, exceeds N), a ``recall_target`` outside (0, 1], or ``gpu=True``
        with HNSW.
    InputError
        For ``points`` that are not a 2-D floating tensor or array.
    MissingDependencyError
        A faiss back end without faiss, or ``gpu=True`` without GPU faiss.
    """

    def __init__(
        self,
        points,
        backend: SearchBackend | str = SearchBackend.TORCH,
        *,
        k: int = 1,
        recall_target: float = RECALL_TARGET,
        seed: int = 0,
        gpu: bool | None = None,
        space: str | None = None,
    ):
        self._configure(points, backend, k, recall_target, seed, gpu)
        self.space = space
        self._index = None
        if self.backend in (SearchBackend.TORCH, SearchBackend.EXACT):
            # exact's two kernels must rank alike whatever the batch size: with faiss in play a
            # half-precision cache is searched in float32 by torch too
            half = self.points.dtype in (torch.float16, torch.bfloat16)
            self._search_points = (self.points.float() if half and self._faiss is not None
                                   else self.points)
            self._sq_norms = self._search_points.square().sum(1)
        if self.backend is SearchBackend.FAISS or (
                self.backend is SearchBackend.EXACT and self._faiss is not None):
            self._index = self._faiss.IndexFlatL2(self.dim)
            for _, x in _chunks(self.points, np.arange(len(self))):
                self._index.add(x)
        elif self.backend in _APPROXIMATE:
            self._build_approximate()
        self._to_gpu()

    # ----------------------------------------------------------------------------- construction

    def _configure(self, points, backend, k, recall_target, seed, gpu) -> None:
        """Validate the arguments and set the attributes every back end shares."""
        backend = parse_enum(SearchBackend, backend, "search backend")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"k must be a positive integer, got {k!r}")
        if not 0 < recall_target <= 1:
            raise ConfigurationError(f"recall_target must lie in (0, 1], got {recall_target!r}")
        if not isinstance(points, (torch.Tensor, np.ndarray)):
            raise InputError(f"points must be a torch tensor or numpy array, got {type(points).__name__}")
        if points.ndim != 2:
            raise InputError(f"points must be 2-D (rows x features), got shape {tuple(points.shape)}")
        floating = points.is_floating_point() if isinstance(points, torch.Tensor) else (
            np.issubdtype(points.dtype, np.floating))
        if not floating:
            raise InputError(f"points must have a floating dtype, got {points.dtype}")
        if backend is SearchBackend.AUTO:
            backend = SearchBackend.EXACT if len(points) <= AUTO_EXACT_MAX_ROWS else SearchBackend.IVF
        if backend in _APPROXIMATE and k > len(points):
            raise ConfigurationError(f"recall@{k} cannot be measured on {len(points)} rows; lower k")
        mapped = isinstance(points, np.ndarray)
        if backend in (SearchBackend.TORCH, SearchBackend.EXACT) and mapped:
            with warnings.catch_warnings():
                # A read-only memmap: torch warns that the tensor is not writable. The index
                # only ever reads it, and sharing the memory avoids a copy of the cache.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                points = torch.from_numpy(points)
        self.points = points
        self.dim = int(points.shape[1])
        self.backend = backend
        self.k, self.recall_target, self.seed = k, float(recall_target), int(seed)
        self.recall, self.params = 1.0, {}
        self.recall_queries, self.held_out = 0, False
        self._ids: np.ndarray | None = None  # faiss id -> row number, where they differ (HNSW)
        self._gpu = False
        self._faiss = None
        if backend is SearchBackend.EXACT:
            # faiss helps only on the CPU, would round float64 to float32 and would copy a
            # memory-mapped cache whole: torch alone there
            if not (mapped or points.device.type != "cpu" or points.dtype == torch.float64):
                self._faiss = _faiss_if_installed()
        elif backend is not SearchBackend.TORCH:
            self._faiss = import_faiss()
            self._gpu = _wants_gpu(self._faiss, gpu, points, backend)

    def _build_approximate(self) -> None:
        """Build on all rows but a held-out sample, tune on the sample, then add it."""
        n = len(self)
        rng = np.random.default_rng(self.seed)
        if n >= MIN_ROWS_TO_HOLD_OUT and n - HELD_OUT_ROWS >= self.k:
            held = np.sort(rng.choice(n, HELD_OUT_ROWS, replace=False))
            build = np.setdiff1d(np.arange(n), held, assume_unique=True)
            queries, self.held_out = held, True
        else:
            # Too few rows to spare: recall is measured on a sample of the indexed rows
            # themselves, which flatters it (each query's own row is among its neighbours).
            held, build = np.empty(0, dtype=np.int64), np.arange(n)
            queries = np.sort(rng.choice(n, min(n, HELD_OUT_ROWS), replace=False))
        self.recall_queries = len(queries)
        q = _rows_f32(self.points, queries)
        exact = _exact_knn(self._faiss, self.points, build, q, self.k)
        if self.backend is SearchBackend.IVF:
            self._build_ivf(build, rng)
        else:
            self._build_hnsw(build)
        self._tune(q, exact)
        for rows, x in _chunks(self.points, held):
            self._add(rows, x)

    def _build_ivf(self, build: np.ndarray, rng: np.random.Generator) -> None:
        faiss = self._faiss
        # ~4 sqrt(N) lists, but at least 39 training rows per list (faiss warns below that).
        nlist = int(max(1, min(round(4 * len(build) ** 0.5), len(build) // 39)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.dim), self.dim, nlist)
        index.cp.seed = self.seed
        n_train = min(len(build), IVF_TRAIN_ROWS_PER_LIST * nlist)
        train = np.sort(rng.choice(build, n_train, replace=False))
        index.train(_rows_f32(self.points, train))
        self._index, self.params = index, {"nlist": nlist, "nprobe": 1}
        # IVF stores ids, so rows keep their own numbers whatever order they are added in.
        for rows, x in _chunks(self.points, build):
            self._add(rows, x)

    def _build_hnsw(self, build: np.ndarray) -> None:
        index = self._faiss.IndexHNSWFlat(self.dim, HNSW_M)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        self._index, self.params = index, {"efSearch": max(16, self.k)}
        # HNSW numbers rows in add order (no add_with_ids): build rows, then the held-out ones.
        self._ids = np.empty(len(self), dtype=np.int64)
        self._added = 0
        for rows, x in _chunks(self.points, build):
            self._add(rows, x)

    def _add(self, rows: np.ndarray, x: np.ndarray) -> None:
        if self.backend is SearchBackend.IVF:
            self._index.add_with_ids(x, rows)
        else:
            self._ids[self._added : self._added + len(rows)] = rows
            self._added += len(rows)
            self._index.add(x)

    def _tune(self, q: np.ndarray, exact: np.ndarray) -> None:
        """Double nprobe / efSearch until the measured recall@k reaches the target."""
        name, cap = (("nprobe", self.params["nlist"]) if self.backend is SearchBackend.IVF
                     else ("efSearch", max(HNSW_MAX_EF_SEARCH, self.k)))
        while True:
            self._apply_params()
            found = self._map_ids(self._index.search(q, self.k)[1])
            self.recall = float((found[:, :, None] == exact[:, None, :]).any(2).mean())
            if self.recall >= self.recall_target or self.params[name] >= cap:
                break
            self.params[name] = min(2 * self.params[name], cap)
        if self.recall < self.recall_target:
            warnings.warn(f"{self.describe()}: below the recall target {self.recall_target}",
                          RuntimeWarning, stacklevel=4)

    def _apply_params(self) -> None:
        if self.backend is SearchBackend.IVF:
            self._index.nprobe = self.params["nprobe"]
        elif self.backend is SearchBackend.HNSW:
            self._index.hnsw.efSearch = self.params["efSearch"]

    def _to_gpu(self) -> None:
        # Untested here (no GPU faiss on the CI machine); guarded so faiss-cpu never reaches it.
        # nprobe is set before the copy: the GPU clone takes it from the CPU index.
        if self._gpu:
            self._index = self._faiss.index_cpu_to_all_gpus(self._index)

    # ------------------------------------------------------------------------------------ use

    def __len__(self) -> int:
        """Return the number of indexed rows, N."""
        return self.points.shape[0]

    def describe(self) -> str:
        """Return one line: the back end, its parameters and the recall it measured."""
        if self.backend is SearchBackend.EXACT:
            kernels = "torch" if self._index is None else "faiss for large batches, else torch"
            return f"exact ({kernels})"
        if self.backend not in _APPROXIMATE:
            return f"{self.backend.value} (exact)"
        params = ", ".join(f"{k} {v}" for k, v in self.params.items())
        where = "held-out" if self.held_out else "indexed"
        return (f"{self.backend.value} ({params}, recall@{self.k} {self.recall:.3f} "
                f"on {self.recall_queries} {where} rows)")

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Return the indices of the k nearest rows to each query, nearest first.

        An approximate search that finds fewer than k rows for a query searches it exactly.

        Parameters
        ----------
        queries : Tensor
            (B, d) points in the index's coordinates.
        k : int
            In [1, N].

        Returns
        -------
        Tensor
            (B, k) row numbers (int64) on the queries' device.

        Raises
        ------
        ConfigurationError
            For ``k`` outside [1, N].
        InputError
            For queries not of shape (B, d).
        """
        if not 1 <= k <= len(self):
            raise ConfigurationError(f"k must lie in [1, {len(self)}], got {k}")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise InputError(f"queries must have shape (B, {self.dim}), got {tuple(queries.shape)}")
        if self.backend is not SearchBackend.TORCH and (
                self.backend is not SearchBackend.EXACT or self._faster_in_faiss(queries)):
            q = as_faiss(queries)
            idx = self._map_ids(self._index.search(q, k)[1])
            missing = (idx < 0).any(1)
            if missing.any():  # an approximate search found fewer than k rows: search exactly
                idx[missing] = _exact_knn(self._faiss, self.points, np.arange(len(self)), q[missing], k)
            return torch.from_numpy(idx).to(queries.device)
        out = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
        step = max(SEARCH_CHUNK_MIN_QUERIES, SEARCH_CHUNK_ELEMENTS // max(1, len(self)))
        for s in range(0, queries.shape[0], step):
            points = self._search_points
            q = queries[s : s + step].to(points.device, points.dtype)
            # ||q - x||^2 up to the per-query constant ||q||^2, which does not change the order.
            dist = torch.addmm(self._sq_norms, q, points.T, alpha=-2.0)
            if k == 1:  # argmin is several times cheaper than a sorted top-k
                out[s : s + step, 0] = dist.argmin(dim=1)
            else:
                out[s : s + step] = dist.topk(k, dim=1, largest=False, sorted=True).indices
        return out

    def _faster_in_faiss(self, queries: torch.Tensor) -> bool:
        """Whether ``exact`` hands this call to faiss (see :data:`FAISS_MIN_QUERY_VALUES`)."""
        return (self._index is not None and queries.device.type == "cpu"
                and queries.shape[0] * self.dim >= FAISS_MIN_QUERY_VALUES)

    def __getstate__(self) -> dict:
        """Return the pickled state: the faiss index as its serialised bytes, no faiss module.

        faiss objects do not pickle, and ``copy.deepcopy`` of a fitted GAPA relies on this.
        """
        state = dict(self.__dict__)
        state["_faiss"] = self._faiss is not None
        if self._index is not None:
            state["_index"] = self._index_bytes()
        return state

    def __setstate__(self, state: dict) -> None:
        """Restore :meth:`__getstate__`'s state, deserialising the faiss index."""
        self.__dict__.update(state)
        self._faiss = import_faiss() if state["_faiss"] else None
        if self._index is not None:
            self._index = self._faiss.deserialize_index(self._index)
            self._apply_params()
            self._to_gpu()

    def _index_bytes(self) -> np.ndarray:
        """Return the faiss index serialised (a GPU index is copied back to the CPU first)."""
        index = self._index
        if self._gpu and hasattr(self._faiss, "index_gpu_to_cpu"):
            index = self._faiss.index_gpu_to_cpu(index)
        return self._faiss.serialize_index(index)

    def _map_ids(self, idx: np.ndarray) -> np.ndarray:
        """Map faiss ids to row numbers (-1, 'not found', stays -1)."""
        if self._ids is None:
            return idx
        return np.where(idx >= 0, self._ids[idx], -1)

    # ---------------------------------------------------------------------------- persistence

    def state(self) -> dict:
        """Return what :meth:`from_state` needs to rebuild this index without retraining.

        Arrays sit only under ``index_bytes`` (uint8, the faiss index) and ``ids`` (int64); every
        other value is JSON-safe. Exact back ends store no index: they are rebuilt from the
        points.
        """
        state = {
            "backend": self.backend.value, "params": dict(self.params), "recall": self.recall,
            "k": self.k, "recall_target": self.recall_target, "seed": self.seed,
            "recall_queries": self.recall_queries, "held_out": self.held_out,
            "rows": len(self), "dim": self.dim,
        }
        if self.space is not None:
            state["space"] = self.space
        if self.backend in _APPROXIMATE:
            state["index_bytes"] = self._index_bytes()
            if self._ids is not None:
                state["ids"] = self._ids.copy()
        return state

    @classmethod
    def from_state(cls, points, state: dict, *, gpu: bool | None = None) -> NeighbourIndex:
        """Rebuild the index :meth:`state` describes, over the same ``points``.

        An approximate index is deserialized, not retrained, so it returns the same neighbours
        as the original; an exact one is built anew.

        Parameters
        ----------
        points
            The rows the index was built on.
        state : dict
            From :meth:`state`.
        gpu : bool, optional
            As for the constructor.

        Returns
        -------
        NeighbourIndex

        Raises
        ------
        InputError
            The saved index covers another number of rows or dimensions than ``points``.
        ConfigurationError, MissingDependencyError
            As for the constructor.
        """
        common = {"k": int(state["k"]), "recall_target": float(state["recall_target"]),
                  "seed": int(state["seed"]), "gpu": gpu}
        backend = parse_enum(SearchBackend, state["backend"], "search backend")
        if backend not in _APPROXIMATE:
            return cls(points, backend, **common, space=state.get("space"))
        self = cls.__new__(cls)
        self._configure(points, backend, **common)
        self.space = state.get("space")
        if (len(self), self.dim) != (int(state["rows"]), int(state["dim"])):
            raise InputError(f"the saved index covers {state['rows']} x {state['dim']} points, "
                             f"got {len(self)} x {self.dim}")
        self._index = self._faiss.deserialize_index(np.asarray(state["index_bytes"], dtype=np.uint8))
        if (self._index.ntotal, self._index.d) != (len(self), self.dim):
            raise InputError(f"the saved faiss index holds {self._index.ntotal} x "
                             f"{self._index.d} vectors, not the {len(self)} x {self.dim} points")
        if "ids" in state:
            self._ids = np.asarray(state["ids"], dtype=np.int64)
        self.params = {name: int(v) for name, v in state["params"].items()}
        self.recall = float(state["recall"])
        self.recall_queries, self.held_out = int(state["recall_queries"]), bool(state["held_out"])
        self._apply_params()
        self._to_gpu()
        return self


def as_faiss(t: torch.Tensor) -> np.ndarray:
    """Return a tensor as faiss takes it: float32, CPU, C-contiguous numpy."""
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _rows_f32(points, rows: np.ndarray) -> np.ndarray:
    """Return the given rows of ``points`` as a C-contiguous float32 numpy array (for faiss)."""
    if isinstance(points, torch.Tensor):
        return as_faiss(points[torch.from_numpy(rows)])
    return np.ascontiguousarray(points[rows], dtype=np.float32)


def _chunks(points, rows: np.ndarray):
    """Yield (row numbers, float32 rows) in chunks of at most ``ADD_CHUNK_ROWS``."""
    for s in range(0, len(rows), ADD_CHUNK_ROWS):
        part = rows[s : s + ADD_CHUNK_ROWS]
        yield part, _rows_f32(points, part)


def _exact_knn(faiss, points, rows: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Return the row numbers (B, k) of the exact k nearest among ``rows``.

    It searches one chunk of rows at a time: a flat index over the whole cache would be a
    second full float32 copy.
    """
    best_d = np.full((len(q), 0), np.inf, dtype=np.float32)
    best_i = np.empty((len(q), 0), dtype=np.int64)
    # faiss computes batched flat distances as |x|^2 - 2 x.y + |y|^2, which cancels when the
    # nearest rows are much closer than the rows' norms (dense caches) and then misranks them:
    # the reference must use the direct sum of squared differences, which faiss does below
    # distance_compute_blas_threshold: query values in faiss 1.15 (queries in older releases,
    # so the bound below holds for both). The setting is process-wide: the lock keeps two
    # threads from restoring each other's value.
    with _BLAS_THRESHOLD_LOCK:
        threshold = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = min(len(q) * q.shape[1] + 1, 2**31 - 1)
        try:
            parts = [(part, _flat_search(faiss, x, q, min(k, len(part))))
                     for part, x in _chunks(points, rows)]
        finally:
            faiss.cvar.distance_compute_blas_threshold = threshold
    for part, (d, i) in parts:
        best_d = np.concatenate([best_d, d], 1)
        best_i = np.concatenate([best_i, part[i]], 1)
        keep = np.argsort(best_d, axis=1, kind="stable")[:, :k]  # stable: ties go to lower rows
        best_d = np.take_along_axis(best_d, keep, 1)
        best_i = np.take_along_axis(best_i, keep, 1)
    return best_i


def _flat_search(faiss, x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(x)
    return flat.search(q, k)


def _wants_gpu(faiss, gpu: bool | None, points, backend: SearchBackend) -> bool:
    """Decide whether to move the faiss index to the GPU.

    Every faiss GPU call is guarded with ``hasattr`` because faiss-cpu lacks them.
    """
    available = (hasattr(faiss, "get_num_gpus") and hasattr(faiss, "index_cpu_to_all_gpus")
                 and faiss.get_num_gpus() > 0)
    if gpu is None:
        on_cuda = isinstance(points, torch.Tensor) and points.is_cuda
        # faiss has no GPU HNSW: that index stays on the CPU unless the GPU is demanded.
        return available and on_cuda and backend is not SearchBackend.HNSW
    if gpu and not available:
        raise MissingDependencyError(
            "gpu=True needs GPU faiss (faiss-gpu, with a visible CUDA device); "
            "install it or pass gpu=False"
        )
    if gpu and backend is SearchBackend.HNSW:
        raise ConfigurationError("faiss has no GPU HNSW index; use search='ivf' or 'faiss' on GPU")
    return bool(gpu)


def _faiss_if_installed():
    """Return the ``faiss`` module, or None where it is not installed."""
    try:
        return import_faiss()
    except MissingDependencyError:
        return None


def import_faiss():
    """Import and return the ``faiss`` module.

    Raises
    ------
    MissingDependencyError
        faiss is not installed.
    """
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            "the faiss search backends need faiss: pip install faiss-cpu (or use search='torch')"
        ) from exc
    return faiss
