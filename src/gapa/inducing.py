"""Inducing points: M representatives of the cached activations, with the count each stands for."""

from __future__ import annotations

import torch

from .search import import_faiss


def kmeans_inducing(
    points: torch.Tensor, m: int, *, seed: int, iters: int = 10, points_per_centroid: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means centroids (M, d) of ``points`` (N, d) and cluster sizes (M,) over all N rows.

    faiss k-means is trained on at most ``points_per_centroid * M`` sampled rows; every row is
    then assigned to its nearest centroid to count how many training rows each one stands for.
    Empty clusters are dropped, so fewer than M centroids may come back.
    """
    faiss = import_faiss()
    x = points.detach().to("cpu", torch.float32).contiguous().numpy()
    km = faiss.Kmeans(
        x.shape[1], m, niter=iters, seed=seed, max_points_per_centroid=points_per_centroid,
        min_points_per_centroid=1, verbose=False,
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    counts = torch.bincount(torch.from_numpy(assign[:, 0]), minlength=m)
    keep = counts > 0
    centroids = torch.from_numpy(km.centroids)[keep]
    return centroids.to(points.device, points.dtype), counts[keep].to(points.device)


def random_inducing(
    points: torch.Tensor, m: int, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """M rows drawn without replacement, each standing for the rows nearest to it."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(points.shape[0], generator=gen)[:m].to(points.device)
    chosen = points[idx]
    faiss = import_faiss()
    index = faiss.IndexFlatL2(points.shape[1])
    index.add(chosen.detach().to("cpu", torch.float32).contiguous().numpy())
    _, assign = index.search(points.detach().to("cpu", torch.float32).contiguous().numpy(), 1)
    counts = torch.bincount(torch.from_numpy(assign[:, 0]), minlength=m).to(points.device)
    return chosen, counts.clamp_min(1)
