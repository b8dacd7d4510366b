"""The Gaussian-process activation of one call site: its conditioning set and its variance."""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

import torch

from ..capture.store import StoredRows
from ..errors import ConfigurationError, EmptyDataError, InputError, NonFiniteError, parse_enum
from .conditioning import ExactConditioner, local_variance, nearest_variance
from .inducing import kmeans_inducing, random_inducing
from .kernels import (
    AmplitudeRule,
    Hyperparameters,
    LengthscaleRule,
    check_positive,
    check_quantile,
    column_stats,
    estimate_hyperparameters,
    override,
)
from .search import NeighbourIndex, SearchBackend

#: Names the search space of :class:`SearchSpace` in a saved index's state. An index saved
#: without it (before constant units were left out and the rows centred) or with another name
#: was built on other coordinates: :meth:`GPSite.restore` rebuilds it from the rows.
SEARCH_SPACE = "informative-centred"
#: A unit whose cached values span at most this many machine epsilons of their magnitude is
#: constant: such differences are rounding noise, not information about which row is nearest.
CONSTANT_EPS = 4


class Conditioning(str, Enum):
    """How each query's activation GP is conditioned on the cached rows."""

    LOCAL = "local"
    """On the K rows nearest to the query in (lengthscale-scaled) pre-activation space."""
    EXACT = "exact"
    """On every row: the exact GP, a slow reference for small caches."""
    PRIOR = "prior"
    """On nothing: every unit at its prior amplitude. A control, not a method: the difference
    from ``local`` is what conditioning on the training activations adds."""


class Inducing(str, Enum):
    """How M inducing points are chosen from the cache when ``m`` is set."""

    KMEANS = "kmeans"
    """k-means centroids; each carries the size of its cluster."""
    RANDOM = "random"
    """A random subset of cached rows; each carries the number of rows nearest to it."""


@dataclass(frozen=True)
class GPConfig:
    """Options shared by every GAPA call site (see :class:`gapa.GAPA` for their meaning).

    Raises
    ------
    ConfigurationError
        For an option that cannot be right (see :meth:`__post_init__`).
    """

    k: int = 1
    m: int | None = 512
    conditioning: Conditioning = Conditioning.LOCAL
    search: SearchBackend = SearchBackend.EXACT
    inducing: Inducing = Inducing.KMEANS
    noise_by_count: bool = True
    lengthscale_quantile: float = 0.25
    amplitude_rule: AmplitudeRule = AmplitudeRule.MAX1
    noise_ratio: float = 1e-2
    seed: int = 0
    lengthscale_rule: LengthscaleRule = LengthscaleRule.QUANTILE

    def __post_init__(self):
        """Refuse options that cannot be right (never repair them).

        Enum options may be given as their strings; they are stored as members.

        Raises
        ------
        ConfigurationError
            For a ``k`` or ``m`` that is not a positive integer (``m`` may be None), an unknown
            enum option, a ``noise_by_count`` that is not a bool, a ``lengthscale_quantile``
            outside (0, 1], a ``noise_ratio`` that is not finite and > 0, or a negative
            ``seed``.
        """
        if not _is_int(self.k) or self.k < 1:
            raise ConfigurationError(f"k must be a positive integer, got {self.k!r}")
        if self.m is not None and (not _is_int(self.m) or self.m < 1):
            raise ConfigurationError(f"m must be a positive integer or None, got {self.m!r}")
        for name, kind in (("conditioning", Conditioning), ("search", SearchBackend),
                           ("inducing", Inducing), ("lengthscale_rule", LengthscaleRule)):
            object.__setattr__(self, name, parse_enum(kind, getattr(self, name), name))
        if not isinstance(self.noise_by_count, bool):
            raise ConfigurationError(
                f"noise_by_count must be True or False, got {self.noise_by_count!r}")
        check_quantile(self.lengthscale_quantile)
        object.__setattr__(self, "amplitude_rule",
                           parse_enum(AmplitudeRule, self.amplitude_rule, "amplitude_rule"))
        check_positive("noise_ratio", self.noise_ratio)
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigurationError(f"seed must be a non-negative integer, got {self.seed!r}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def constant_units(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Return which units are constant over rows whose per-unit range is ``lo``..``hi``.

    A unit is constant when its bounds are equal, or within :data:`CONSTANT_EPS` machine
    epsilons of their magnitude (rounding).

    Returns
    -------
    Tensor
        (d,) bool.
    """
    eps = torch.finfo(lo.dtype).eps
    return (hi - lo) <= CONSTANT_EPS * eps * torch.maximum(lo.abs(), hi.abs())


@dataclass(frozen=True)
class SearchSpace:
    """The coordinates neighbours are searched (and inducing points chosen) in.

    A pre-activation ``z`` maps to ``(z[:, keep] - centre) / scale``.

    The nearest rows are those with the largest product kernel, i.e. the smallest sum of
    ``(z_j - x_j)^2 / l_j^2``. A unit constant over the rows adds the same amount to every
    row's sum, so it is left out: with its floored lengthscale its coordinate would be ~1e6 and
    float32 distances (``|x|^2 - 2 q.x``) would cancel to noise. The rest are centred on the
    middle of their range for the same reason; a translation changes no distance. The middle of
    the range (not the mean) is exact and independent of summation order, so a restored site
    computes the same space from the same rows, on any device.
    """

    keep: torch.Tensor | None  #: (d',) indices of the units that vary (None: every unit)
    origin: torch.Tensor  #: (d,) middle of every unit's range; a constant unit's value
    centre: torch.Tensor  #: (d',) the origin of the kept units
    scale: torch.Tensor  #: (d',) lengthscales of the kept units

    @classmethod
    def of(cls, lo: torch.Tensor, hi: torch.Tensor, lengthscale: torch.Tensor) -> SearchSpace:
        """Build the space of rows with per-unit range ``lo``..``hi`` and these lengthscales."""
        origin = lo / 2 + hi / 2  # halves first: no overflow
        varies = ~constant_units(lo, hi)
        if bool(varies.all()):
            return cls(None, origin, origin, lengthscale)
        keep = varies.nonzero()[:, 0]
        return cls(keep, origin, origin[keep], lengthscale[keep])

    @classmethod
    def over(cls, rows: torch.Tensor, lengthscale: torch.Tensor) -> SearchSpace:
        """Build the space of ``rows`` (N x d) with these lengthscales."""
        return cls.of(rows.amin(0), rows.amax(0), lengthscale)

    @property
    def dim(self) -> int:
        """The number of units that vary, d' (0: every row is the same point)."""
        return len(self.scale)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Map pre-activations (B, d) into this space (B, d')."""
        kept = z if self.keep is None else z[:, self.keep]
        return (kept - self.centre).div_(self.scale)

    def lift(self, points: torch.Tensor) -> torch.Tensor:
        """Map points of this space (B, d') back to pre-activations (B, d).

        Constant units get their value.
        """
        if self.keep is None:
            return points * self.scale + self.centre
        out = self.origin.expand(len(points), -1).clone()
        out[:, self.keep] = points * self.scale + self.centre
        return out


class GPSite:
    """A fitted GP activation at one call site of an activation module.

    Neighbours are searched in the pre-activation divided by the per-unit lengthscale, so the
    nearest rows are those with the largest product kernel over all units; units constant over
    the rows are left out and the rest centred (:class:`SearchSpace`). Each unit's variance is
    then computed from its own kernel on the original pre-activations. ``pre`` is the cache: a
    tensor, or the rows of an activation store on disk, read in samples and chunks.

    :meth:`fit` builds a site from the cached pre-activations; :meth:`restore` from saved
    state; both end in the constructor, which takes the conditioning set itself.
    """

    @classmethod
    def fit(
        cls,
        key: str,
        pre: torch.Tensor | StoredRows,
        activation: Callable[[torch.Tensor], torch.Tensor],
        config: GPConfig,
        overrides: dict | None = None,
    ) -> GPSite:
        """Fit the site of call ``key`` on its cached pre-activations ``pre``.

        That is, estimate label-free hyperparameters (with ``overrides``) and choose the
        conditioning set: the cache, or ``m`` inducing points.

        Parameters
        ----------
        key : str
            The call site (see :func:`gapa.capture.hooks.site_key`).
        pre : Tensor or StoredRows
            The cached pre-activations (N x d).
        activation : callable
            The site's activation module.
        config : GPConfig
            The options.
        overrides : dict, optional
            User hyperparameters for this site (see :func:`gapa.gp.kernels.override`).

        Returns
        -------
        GPSite

        Raises
        ------
        EmptyDataError
            Nothing was cached.
        NonFiniteError
            The cache (a tensor) holds NaN or Inf.
        ConfigurationError
            For overrides that cannot be right, more neighbours than conditioning rows, or
            hyperparameters the rows' dtype cannot hold.
        CacheTooLargeError
            Exact conditioning on more than :data:`gapa.gp.conditioning.EXACT_MAX_ROWS` rows.
        MissingDependencyError
            Inducing points are chosen without faiss installed.
        """
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
        stats = column_stats(pre, activation) if n > 1 else None
        hp = estimate_hyperparameters(
            pre, activation, lengthscale_quantile=config.lengthscale_quantile,
            amplitude_rule=config.amplitude_rule, noise=config.noise_ratio, generator=gen, stats=stats,
            lengthscale_rule=config.lengthscale_rule,
        )
        hp = override(hp, overrides, key) if overrides else hp
        # Neighbours are searched in the fit-time scaled space. A common factor on every
        # lengthscale (rescale_lengthscale) changes the kernel but not which rows are nearest.
        if config.conditioning is Conditioning.PRIOR:  # one row keeps the width and dtype
            rows = pre[:1] if isinstance(pre, torch.Tensor) else pre[torch.zeros(1, dtype=torch.long)]
            counts = torch.full((1,), n, device=rows.device)
        elif config.m is None or config.m >= n:
            if not isinstance(pre, torch.Tensor):
                pre = pre.materialize()  # the whole cache conditions every query
            rows, counts = pre, torch.ones(n, device=pre.device)
        else:  # n > m >= 1, so the statistics exist
            space = SearchSpace.of(stats.lo, stats.hi, hp.lengthscale)
            if space.dim == 0:  # every cached row is the same point
                rows = space.origin[None]
                counts = torch.full((1,), n, device=rows.device)
            elif config.inducing is Inducing.KMEANS:
                centroids, counts = kmeans_inducing(pre, config.m, seed=config.seed, transform=space)
                rows = space.lift(centroids)
            else:
                rows, counts = random_inducing(pre, config.m, seed=config.seed, transform=space)
        return cls(key, config, rows, counts, hp, n)

    @classmethod
    def restore(
        cls, key: str, config: GPConfig, rows: torch.Tensor, counts: torch.Tensor,
        hyperparameters: Hyperparameters, cache_size: int, lengthscale_factor: float = 1.0,
        index_state: dict | None = None,
    ) -> GPSite:
        """Rebuild a site from saved state (:mod:`gapa.persistence`), with no cache and no refit.

        Parameters
        ----------
        key : str
            The call site.
        config : GPConfig
            The options.
        rows, counts : Tensor
            The conditioning rows and how many cached rows each stands for.
        hyperparameters : Hyperparameters
            The fitted values, before any lengthscale factor.
        cache_size : int
            Rows of the cache the site was fitted on.
        lengthscale_factor : float
            Applied as by :meth:`rescale_lengthscale`.
        index_state : dict, optional
            From :meth:`gapa.gp.search.NeighbourIndex.state`: restores the index without
            retraining when it was built on this search space (:data:`SEARCH_SPACE`); else the
            index is rebuilt.

        Returns
        -------
        GPSite
        """
        if index_state is not None and index_state.get("space") != SEARCH_SPACE:
            index_state = None
        site = cls(key, config, rows, counts, hyperparameters, cache_size, index_state)
        if lengthscale_factor != 1.0:
            site.rescale_lengthscale(lengthscale_factor)
        return site

    def __init__(self, key: str, config: GPConfig, rows: torch.Tensor, counts: torch.Tensor,
                 hp: Hyperparameters, cache_size: int, index_state: dict | None = None):
        """Condition a site on ``rows`` (each standing for ``counts`` cached rows).

        Builds (or, from ``index_state``, restores) its index. Fitted and restored sites go
        through here with the same values, so a saved site finds the same neighbours to the
        last tie.

        Parameters
        ----------
        key : str
            The call site.
        config : GPConfig
            The options.
        rows : Tensor
            The conditioning rows (pre-activations, M x d).
        counts : Tensor
            (M,) cached rows each stands for; with ``noise_by_count`` a row's noise is
            ``hp.noise / count``.
        hp : Hyperparameters
            The kernel.
        cache_size : int
            Rows of the cache the site was fitted on.
        index_state : dict, optional
            A saved index over these rows, from :meth:`gapa.gp.search.NeighbourIndex.state`.

        Raises
        ------
        ConfigurationError
            For hyperparameters the rows' dtype cannot hold, or more neighbours ``k`` than
            conditioning rows.
        CacheTooLargeError
            Exact conditioning on more than :data:`gapa.gp.conditioning.EXACT_MAX_ROWS` rows.
        """
        self.key = key
        self.config = config
        self.cache_size = cache_size
        self.width = rows.shape[1]
        self.hyperparameters: Hyperparameters = hp
        self._search_scale = hp.lengthscale  # the fitted lengthscale, before any factor
        self.counts = counts
        self.rows = rows  # conditioning inputs (pre-activations)
        weight = counts.to(rows.dtype) if config.noise_by_count else torch.ones_like(counts, dtype=rows.dtype)
        self.row_noise = hp.noise / weight  # relative to the amplitude
        self._check_representable()
        self.timings = {"search": 0.0, "conditioning": 0.0}
        self._space = SearchSpace.over(rows, hp.lengthscale)
        points = self._space(rows)
        if not bool(torch.isfinite(points).all()):
            raise ConfigurationError(
                f"the lengthscales at {key!r} (smallest {float(self._search_scale.min()):.3g}) "
                f"are too small for {rows.dtype}: the pre-activations divided by them overflow")
        self._index = self._finder = None  # no finder: no unit varies, every row is as near
        if config.conditioning is Conditioning.PRIOR:
            self._exact = None
        elif config.conditioning is Conditioning.EXACT:
            self._exact = ExactConditioner(self.rows, self.row_noise, hp)
            if self._space.dim:  # only nearest_distance searches
                self._finder = NeighbourIndex(points, SearchBackend.TORCH)
        else:
            if config.k > len(self.rows):
                raise ConfigurationError(
                    f"k={config.k} neighbours requested at {key!r} but the conditioning set has "
                    f"only {len(self.rows)} rows (cache {self.cache_size}, m={config.m}); "
                    "lower k or fit on more data"
                )
            self._exact = None
            if self._space.dim:
                self._index = self._finder = (
                    NeighbourIndex(points, config.search, k=config.k, seed=config.seed,
                                   space=SEARCH_SPACE)
                    if index_state is None else NeighbourIndex.from_state(points, index_state))

    def _check_representable(self) -> None:
        """Refuse hyperparameters the rows' dtype cannot hold, naming the site.

        Hyperparameters that overflow, or a lengthscale or amplitude that vanishes, in the
        rows' dtype would give NaN variances (user values are checked before, so this catches
        only what the dtype cannot hold). A row's noise may underflow to 0 (half precision,
        large counts): Cholesky jitter covers that.
        """
        hp = self.hyperparameters
        for name, value, zero_ok in (("lengthscale", hp.lengthscale, False),
                                     ("amplitude", hp.amplitude, False),
                                     ("noise / count", self.row_noise, True)):
            ok = torch.isfinite(value) & ((value >= 0) if zero_ok else (value > 0))
            if not bool(ok.all()):
                raise ConfigurationError(
                    f"the {name} at {self.key!r} is not finite and positive in "
                    f"{self.rows.dtype} (from {float(value.min()):.3g} to "
                    f"{float(value.max()):.3g}); choose values the model's dtype can hold")

    @property
    def fitted_lengthscale(self) -> torch.Tensor:
        """The lengthscale the label-free rule (or an override) gave, before any factor."""
        return self._search_scale

    def describe(self) -> str:
        """Return one line: cache size, conditioning set, width and how neighbours are found.

        An approximate index adds the recall it measured at fit time.
        """
        if self._exact is not None:
            how = "exact conditioning"
        elif self.config.conditioning is Conditioning.PRIOR:
            how = "none (prior: no conditioning)"
        elif self._index is None:
            how = "none (no unit varies over the rows: all are as near)"
        else:
            how = self._index.describe()
        constant = self.width - self._space.dim
        left_out = f" ({constant} constant, left out of the search)" if constant else ""
        return (f"{self.key}: {self.cache_size:,} cached rows -> {self.n_conditioning:,} "
                f"conditioning rows x {self.width} units{left_out}; search {how}")

    @property
    def index(self):
        """The neighbour index, over :attr:`search_space`.

        ``None`` for exact conditioning, and where no unit varies over the rows.
        """
        return self._index

    @property
    def search_space(self) -> SearchSpace:
        """The coordinates neighbours are searched in (see :class:`SearchSpace`)."""
        return self._space

    def rescale_lengthscale(self, factor: float) -> None:
        """Set every lengthscale to ``factor`` times its fitted value.

        Neighbour ranks do not change, so the index is kept; a validation search over
        ``factor`` needs no refit.

        Raises
        ------
        ConfigurationError
            For a ``factor`` that is not positive.
        """
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
        """Return the kernel's distance (B,) from each query ``z`` (B, d) to its nearest row.

        The distance is Euclidean over every unit, each divided by its lengthscale. The nearest
        conditioning row is found in the search space; a unit constant over the rows adds the
        same to every row's distance, so leaving it out of the search changes no choice.
        """
        nearest = self.rows[self._neighbours(z, 1)[:, 0]]
        return ((z - nearest) / self.hyperparameters.lengthscale).norm(dim=1)

    def _neighbours(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """Return the indices (B, k) of the k rows nearest to pre-activations ``z`` (B, d)."""
        if self._finder is None:  # no unit varies: every row is as near, take the first k
            return torch.arange(k, device=z.device).expand(len(z), k)
        return self._finder.search(self._space(z), k)

    def variance(self, z: torch.Tensor) -> torch.Tensor:
        """Return the posterior variance of the activation at pre-activations ``z``.

        Parameters
        ----------
        z : Tensor
            (..., d); every leading position is one query.

        Returns
        -------
        Tensor
            The variances, shaped like ``z``.

        Raises
        ------
        InputError
            For a last dimension other than the site's width, or a dtype or device other than
            the fit's.
        """
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
        if self.config.conditioning is Conditioning.PRIOR:
            return hp.amplitude.expand(z.shape).clone()
        if self._exact is not None:
            var = self._exact.variance(z)
            self.timings["conditioning"] += time.perf_counter() - t0
            return var
        idx = self._neighbours(z, self.config.k)
        t1 = time.perf_counter()
        if self.config.k == 1:
            var = nearest_variance(z, self.rows[idx[:, 0]], self.row_noise[idx[:, 0]], hp)
        else:
            var = local_variance(z, self.rows[idx], self.row_noise[idx], hp)
        t2 = time.perf_counter()
        self.timings["search"] += t1 - t0
        self.timings["conditioning"] += t2 - t1
        return var
