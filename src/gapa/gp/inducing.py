"""Inducing points: M representatives of the cached activations, with the count each stands for.

The cache is a tensor, or a :class:`gapa.capture.store.StoredRows` on disk: then k-means trains on a
sample and the cluster counts are streamed shard by shard, so memory stays bounded. Both take a
``transform`` of the rows into the space that nearness is measured in (a GP site's search space:
informative units, centred, over their lengthscales), applied chunk by chunk as rows are read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from .search import as_faiss, import_faiss

Transform = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def kmeans_inducing(
    points, m: int, *, seed: int, iters: int = 10, points_per_centroid: int = 64,
    transform: Transform = _identity,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return k-means centroids of ``transform(points)`` and their cluster sizes.

    faiss k-means is trained on at most ``points_per_centroid * M`` sampled rows; every row is
    then assigned to its nearest centroid to count how many training rows each one stands for.
    Empty clusters are dropped, so fewer than M centroids may come back.

    Parameters
    ----------
    points : Tensor or StoredRows
        The cache (N x d), in memory or on disk.
    m : int
        The number of clusters, M.
    seed : int
        Seeds the sample and faiss.
    iters : int
        k-means iterations.
    points_per_centroid : int
        Training rows per centroid, at most.
    transform : callable
        Maps rows into the space nearness is measured in.

    Returns
    -------
    centroids : Tensor
        (M', d') centroids in the transformed space, M' <= M, in the sample's dtype and device.
    counts : Tensor
        (M',) how many of the N rows each centroid stands for (all positive).

    Raises
    ------
    MissingDependencyError
        faiss is not installed.
    """
    faiss = import_faiss()
    if isinstance(points, torch.Tensor):
        sample = transform(points)
        chunks = [sample]  # faiss samples the rows itself
    else:
        gen = torch.Generator().manual_seed(seed)
        n_sample = min(len(points), points_per_centroid * m)
        sample = transform(points[torch.randperm(len(points), generator=gen)[:n_sample].sort().values])
        chunks = map(transform, points.chunks())
    x = as_faiss(sample)
    km = faiss.Kmeans(
        x.shape[1], m, niter=iters, seed=seed, max_points_per_centroid=points_per_centroid,
        min_points_per_centroid=1, verbose=False,
    )
    km.train(x)
    counts = _cluster_sizes(km.index, chunks, m)
    keep = counts > 0
    centroids = torch.from_numpy(km.centroids)[keep]
    return centroids.to(sample.device, sample.dtype), counts[keep].to(sample.device)


def random_inducing(
    points, m: int, *, seed: int, transform: Transform = _identity
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return M rows of ``points`` drawn without replacement, and the rows each stands for.

    Parameters
    ----------
    points : Tensor or StoredRows
        The cache (N x d), in memory or on disk.
    m : int
        How many rows to draw, M.
    seed : int
        Seeds the draw.
    transform : callable
        Maps rows into the space nearness is measured in.

    Returns
    -------
    rows : Tensor
        (M, d) the chosen rows as they are (untransformed).
    counts : Tensor
        (M,) how many of the N rows are nearest to each in the transformed space, at least 1.

    Raises
    ------
    MissingDependencyError
        faiss is not installed.
    """
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(points), generator=gen)[:m]
    if isinstance(points, torch.Tensor):
        chosen, chunks = points[idx.to(points.device)], [transform(points)]
    else:
        chosen, chunks = points[idx], map(transform, points.chunks())
    faiss = import_faiss()
    mapped = transform(chosen)
    index = faiss.IndexFlatL2(mapped.shape[1])
    index.add(as_faiss(mapped))
    counts = _cluster_sizes(index, chunks, m).to(chosen.device)
    return chosen, counts.clamp_min(1)


def _cluster_sizes(index, chunks: Iterable[torch.Tensor], m: int) -> torch.Tensor:
    """How many rows of ``chunks`` have each of the ``m`` indexed points as nearest."""
    counts = np.zeros(m, dtype=np.int64)
    for chunk in chunks:
        _, assign = index.search(as_faiss(chunk), 1)
        counts += np.bincount(assign[:, 0], minlength=m)
    return torch.from_numpy(counts)
