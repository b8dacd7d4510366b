"""The Gaussian-process activation of one call site: its conditioning set and its variance."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

import torch

from .conditioning import ExactConditioner, local_variance, nearest_variance
from .errors import ConfigurationError, EmptyDataError, InputError, NonFiniteError
from .inducing import kmeans_inducing, random_inducing
from .kernels import Hyperparameters, estimate_hyperparameters, override
from .search import NeighbourIndex, SearchBackend
from .store import StoredRows


class Conditioning(str, Enum):
    """How each query's activation GP is conditioned on the cached rows."""

    LOCAL = "local"
    """On the K rows nearest to the query in (lengthscale-scaled) pre-activation space."""
    EXACT = "exact"
    """On every row: the exact GP, a slow reference for small caches."""


class Inducing(str, Enum):
    """How M inducing points are chosen from the cache when ``m`` is set."""

    KMEANS = "kmeans"
    """k-means centroids; each carries the size of its cluster."""
    RANDOM = "random"
    """A random subset of cached rows; each carries the number of rows nearest to it."""


@dataclass(frozen=True)
class GPConfig:
    """Options shared by every GAPA call site (see :class:`gapa.GAPA` for their meaning)."""

    k: int = 1
    m: int | None = 512
    conditioning: Conditioning = Conditioning.LOCAL
    search: SearchBackend = SearchBackend.TORCH
    inducing: Inducing = Inducing.KMEANS
    count_noise: bool = True
    lengthscale_quantile: float = 0.25
    amplitude_rule: str = "max1"
    noise: float = 1e-2
    seed: int = 0


class GPSite:
    """A fitted GP activation at one call site of an activation module.

    The search space is the pre-activation divided by the per-unit lengthscale, so the nearest
    rows are those with the largest product kernel over all units. ``pre`` is the cache: a
    tensor, or the rows of an activation store on disk, read in samples and chunks.
    """

    def __init__(
        self,
        key: str,
        pre: torch.Tensor | StoredRows,
        activation: Callable[[torch.Tensor], torch.Tensor],
        config: GPConfig,
        overrides: dict | None = None,
    ):
        n = len(pre)
        if n == 0:
            raise EmptyDataError(f"no activations were cached at {key!r}: the training set is empty")
        if isinstance(pre, torch.Tensor):  # a store checks its rows as it writes them
            bad = ~torch.isfinite(pre)
            if bool(bad.any()):
                rows = bad.any(1).nonzero()[:5, 0].tolist()
                raise NonFiniteError(
                    f"the cached pre-activations at {key!r} contain {int(bad.sum())} NaN/Inf "
                    f"values (first rows: {rows}); the model produces non-finite activations on "
                    "the training data: clean the data or fix the model before fitting"
                )
        gen = torch.Generator().manual_seed(config.seed)
        hp = estimate_hyperparameters(
            pre, activation, lengthscale_quantile=config.lengthscale_quantile,
            amplitude_rule=config.amplitude_rule, noise=config.noise, generator=gen,
        )
        hp = override(hp, overrides) if overrides else hp
        # Neighbours are searched in the fit-time scaled space. A common factor on every
        # lengthscale (rescale_lengthscale) changes the kernel but not which rows are nearest.
        if config.m is None or config.m >= n:
            if not isinstance(pre, torch.Tensor):
                pre = pre.materialize()  # the whole cache conditions every query
            rows, counts = pre, torch.ones(n, device=pre.device)
        else:
            scaled = pre / hp.lengthscale if isinstance(pre, torch.Tensor) else pre.scaled(hp.lengthscale)
            choose = kmeans_inducing if config.inducing is Inducing.KMEANS else random_inducing
            rows, counts = choose(scaled, config.m, seed=config.seed)
            rows = rows * hp.lengthscale
        self._build(key, config, rows, counts, hp, n)

    @classmethod
    def restore(
        cls, key: str, config: GPConfig, rows: torch.Tensor, counts: torch.Tensor,
        hyperparameters: Hyperparameters, cache_size: int, lengthscale_factor: float = 1.0,
        index_state: dict | None = None,
    ) -> GPSite:
        """A site from saved state (:mod:`gapa.persistence`): the conditioning rows, their
        counts and the fitted hyperparameters, with no cache and no refit; ``index_state``
        (from :meth:`gapa.search.NeighbourIndex.state`) restores the index without retraining."""
        site = cls.__new__(cls)
        site._build(key, config, rows, counts, hyperparameters, cache_size, index_state)
        if lengthscale_factor != 1.0:
            site.rescale_lengthscale(lengthscale_factor)
        return site

    def _build(self, key, config, rows, counts, hp, cache_size, index_state=None):
        """Set the conditioning set and build its index, from the same values whether fitted
        or restored, so a saved site finds the same neighbours to the last tie."""
        self.key = key
        self.config = config
        self.cache_size = cache_size
        self.width = rows.shape[1]
        self.hyperparameters: Hyperparameters = hp
        self._search_scale = hp.lengthscale  # the fitted lengthscale, before any factor
        self.counts = counts
        self.rows = rows  # conditioning inputs (pre-activations)
        weight = counts.to(rows.dtype) if config.count_noise else torch.ones_like(counts, dtype=rows.dtype)
        self.row_noise = hp.noise / weight  # relative to the amplitude
        self.timings = {"search": 0.0, "conditioning": 0.0}
        if config.conditioning is Conditioning.EXACT:
            self._exact = ExactConditioner(self.rows, self.row_noise, hp)
            self._index = None
        else:
            if config.k > len(self.rows):
                raise ConfigurationError(
                    f"k={config.k} neighbours requested at {key!r} but the conditioning set has "
                    f"only {len(self.rows)} rows (cache {self.cache_size}, m={config.m}); "
                    "lower k or fit on more data"
                )
            self._exact = None
            scaled = self.rows / self._search_scale
            self._index = (
                NeighbourIndex(scaled, config.search, k=config.k, seed=config.seed)
                if index_state is None else NeighbourIndex.from_state(scaled, index_state))

    @property
    def fitted_lengthscale(self) -> torch.Tensor:
        """The lengthscale the label-free rule (or an override) gave, before any factor."""
        return self._search_scale

    def describe(self) -> str:
        """One line: cache size, conditioning set, width and how neighbours are found (with the
        recall an approximate index measured at fit time)."""
        how = "exact conditioning" if self._index is None else self._index.describe()
        return (f"{self.key}: {self.cache_size:,} cached rows -> {self.n_conditioning:,} "
                f"conditioning rows x {self.width} units; search {how}")

    @property
    def index(self):
        """The neighbour index (``None`` for exact conditioning)."""
        return self._index

    def rescale_lengthscale(self, factor: float) -> None:
        """Set every lengthscale to ``factor`` times its fitted value. Neighbour ranks do not
        change, so the index is kept; a validation search over ``factor`` needs no refit."""
        if not factor > 0:
            raise ConfigurationError(f"lengthscale factor must be positive, got {factor}")
        self.hyperparameters = replace(self.hyperparameters, lengthscale=self._search_scale * factor)
        if self._exact is not None:
            self._exact = ExactConditioner(self.rows, self.row_noise, self.hyperparameters)

    @property
    def n_conditioning(self) -> int:
        """Rows the GP conditions on: the cache size, or the number of inducing points."""
        return len(self.rows)

    def nearest_distance(self, z: torch.Tensor) -> torch.Tensor:
        """Euclidean distance (B,) from each query to its nearest conditioning row, in the
        lengthscale-scaled space the neighbours are searched in."""
        scale = self.hyperparameters.lengthscale
        nearest = self.rows[self._search(z / self._search_scale, 1)[:, 0]]
        return ((z - nearest) / scale).norm(dim=1)

    def _search(self, scaled: torch.Tensor, k: int) -> torch.Tensor:
        if self._index is None:  # exact conditioning keeps no index: search the rows directly
            return torch.cdist(scaled, self.rows / self._search_scale).topk(
                k, dim=1, largest=False).indices
        return self._index.search(scaled, k)

    def variance(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior variance of the activation at pre-activations ``z`` (..., d), same shape;
        every leading position is one query."""
        if z.dim() != 2 and z.shape[-1:] == (self.width,):
            return self.variance(z.reshape(-1, self.width)).reshape(z.shape)
        if z.shape[-1] != self.width:
            raise InputError(
                f"the GAPA layer {self.key!r} has {self.width} units but received a "
                f"pre-activation of shape {tuple(z.shape)}"
            )
        hp = self.hyperparameters
        if z.dtype != self.rows.dtype or z.device != self.rows.device:
            raise InputError(
                f"{self.key!r} was fitted in {self.rows.dtype} on {self.rows.device} but "
                f"received {z.dtype} on {z.device}; fit and predict in the same dtype and device"
            )
        t0 = time.perf_counter()
        if self._exact is not None:
            var = self._exact.variance(z)
            self.timings["conditioning"] += time.perf_counter() - t0
            return var
        idx = self._search(z / self._search_scale, self.config.k)
        t1 = time.perf_counter()
        if self.config.k == 1:
            var = nearest_variance(z, self.rows[idx[:, 0]], self.row_noise[idx[:, 0]], hp)
        else:
            var = local_variance(z, self.rows[idx], self.row_noise[idx], hp)
        t2 = time.perf_counter()
        self.timings["search"] += t1 - t0
        self.timings["conditioning"] += t2 - t1
        return var
