"""Nearest-neighbour search over cached activations: exact torch search, or faiss.

Both back ends return neighbours by squared Euclidean distance. faiss searches in float32; the
variances are then computed from the stored rows in the model's own dtype.
"""

from __future__ import annotations

from enum import Enum

import torch

from .errors import ConfigurationError, MissingDependencyError

#: Query x row distances computed per chunk by the torch back end (bounds temporary memory).
SEARCH_CHUNK_ELEMENTS = 1 << 24


class SearchBackend(str, Enum):
    """Where the K nearest cached rows are found."""

    TORCH = "torch"
    """Exact search with matrix products and ``topk``; always available, any dtype and device."""
    FAISS = "faiss"
    """Exact search with faiss ``IndexFlatL2`` (float32, CPU); needs ``pip install faiss-cpu``."""


class NeighbourIndex:
    """Exact K-nearest-neighbour index over the rows of ``points`` (N x d)."""

    def __init__(self, points: torch.Tensor, backend: SearchBackend | str = SearchBackend.TORCH):
        try:
            self.backend = SearchBackend(backend)
        except ValueError:
            options = ", ".join(repr(b.value) for b in SearchBackend)
            raise ConfigurationError(f"unknown search backend {backend!r}; use one of {options}") from None
        self.points = points
        if self.backend is SearchBackend.FAISS:
            faiss = import_faiss()
            self._index = faiss.IndexFlatL2(points.shape[1])
            self._index.add(points.detach().to("cpu", torch.float32).contiguous().numpy())
        else:
            self._sq_norms = points.square().sum(1)

    def __len__(self) -> int:
        return self.points.shape[0]

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Indices (B, k) of the k nearest rows to each query, nearest first."""
        if self.backend is SearchBackend.FAISS:
            q = queries.detach().to("cpu", torch.float32).contiguous().numpy()
            _, idx = self._index.search(q, k)
            return torch.from_numpy(idx).to(queries.device)
        out = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
        step = max(1, SEARCH_CHUNK_ELEMENTS // max(1, len(self)))
        for s in range(0, queries.shape[0], step):
            q = queries[s : s + step]
            # ||q - x||^2 up to the per-query constant ||q||^2, which does not change the order.
            dist = torch.addmm(self._sq_norms, q, self.points.T, alpha=-2.0)
            if k == 1:  # argmin is several times cheaper than a sorted top-k
                out[s : s + step, 0] = dist.argmin(dim=1)
            else:
                out[s : s + step] = dist.topk(k, dim=1, largest=False, sorted=True).indices
        return out


def import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            "the 'faiss' search backend needs faiss: pip install faiss-cpu (or use search='torch')"
        ) from exc
    return faiss
