"""What a fit will cost before anything is allocated: cache, conditioning set, index, memory.

``gm.plan(n_train, example)`` (and ``gapa plan`` on the command line) estimates, per call site,
the size of the activation cache (in memory or on disk), of the conditioning set and of its
neighbour index, the arithmetic per query, and the peak resident memory of the fit, from the
widths one forward pass on ``example`` reveals. ``fit(memory_budget=...)`` refuses a plan that
exceeds the budget. The estimates leave out the model itself and one batch's activations.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import ConfigurationError, MemoryBudgetError
from .search import (
    AUTO_EXACT_MAX_ROWS,
    HNSW_M,
    SearchBackend,
)
from .site import Conditioning, GPConfig
from .store import SHARD_ROWS

#: Search-time settings assumed before the fit tunes them (the tuned values are reported by
#: ``gm.summary()``): IVF lists probed, HNSW beam width.
ASSUMED_NPROBE = 8
ASSUMED_EF_SEARCH = 64
#: k-means trains on at most this many rows per inducing point (gapa.inducing).
KMEANS_ROWS_PER_CENTROID = 64
FLOAT_BYTES = {"float32": 4, "float16": 2, "float64": 8}

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """``4294967296``, ``"4GiB"``, ``"512 MB"``, ``"1.5e9"`` -> bytes."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigurationError(f"a memory budget must be positive, got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
    if not match or match.group(2) not in _UNITS:
        raise ConfigurationError(
            f"cannot read {value!r} as a size; write bytes or a number with a unit such as "
            "'4GiB', '512MiB' or '2GB'")
    return parse_bytes(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class SitePlan:
    """The expected cost of one call site."""

    key: str
    width: int
    cache_rows: int  #: training inputs x queries per input
    conditioning_rows: int  #: M inducing points, or the whole cache
    search: str  #: the back end ``auto`` resolves to at this size
    cache_bytes: int
    conditioning_bytes: int
    index_bytes: int
    query_flops: int  #: multiply-adds per query: search plus conditioning


@dataclass(frozen=True)
class Plan:
    """The expected cost of a fit; ``str(plan)`` is a table."""

    n_train: int
    sites: tuple[SitePlan, ...]
    store: bool
    store_dtype: str
    peak_bytes: int  #: resident memory of the fit, excluding the model and a batch's activations
    disk_bytes: int

    def check(self, budget: int | float | str) -> Plan:
        """Raise :class:`gapa.MemoryBudgetError` when the fit needs more than ``budget``."""
        limit = parse_bytes(budget)
        if self.peak_bytes > limit:
            hint = ("" if self.store else "; fit(..., store=DIR) keeps the cache on disk")
            raise MemoryBudgetError(
                f"the fit needs about {_size(self.peak_bytes)} of resident memory, over the "
                f"budget of {_size(limit)}{hint}; or lower m, or cache fewer layers\n{self}")
        return self

    def __str__(self) -> str:
        where = f"on disk ({self.store_dtype})" if self.store else "in memory"
        head = ["site", "width", "cache rows", "cache", "conditioning rows", "search", "index",
                "multiply-adds / query"]
        rows = [[s.key, f"{s.width:,}", f"{s.cache_rows:,}", _size(s.cache_bytes),
                 f"{s.conditioning_rows:,}", s.search, _size(s.index_bytes),
                 f"{s.query_flops:,}"] for s in self.sites]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines = [f"GAPA fit plan: {self.n_train:,} training inputs, cache {where}",
                 "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                  for r in rows]
        lines.append(f"peak resident memory of the fit: about {_size(self.peak_bytes)} "
                     "(the model and one batch's activations excluded); "
                     f"disk: {_size(self.disk_bytes)}")
        return "\n".join(lines)


def plan_fit(
    n_train: int, sites: dict[str, tuple[int, int]], config: GPConfig, *, store: bool = False,
    store_dtype: str = "float32", compute_dtype: str = "float32",
) -> Plan:
    """The plan for ``n_train`` inputs; ``sites`` maps each call site to ``(width, queries per
    input)`` (1 for an MLP or ``queries="inputs"``, H x W for a feature map's positions)."""
    if not isinstance(n_train, int) or n_train < 1:
        raise ConfigurationError(f"n_train must be a positive integer, got {n_train!r}")
    if store_dtype not in ("float32", "float16"):
        raise ConfigurationError(f"store_dtype must be float32 or float16, got {store_dtype!r}")
    item = FLOAT_BYTES.get(compute_dtype, 4)
    plans, extra, disk = [], 0, 0
    for key, (width, per_input) in sites.items():
        n = n_train * per_input
        m = n if config.m is None else min(config.m, n)
        cache = n * width * (FLOAT_BYTES[store_dtype] if store else item)
        search, index = _index(n if config.m is None else m, width, config)
        site = SitePlan(
            key=key, width=width, cache_rows=n, conditioning_rows=m, search=search,
            cache_bytes=cache, conditioning_bytes=m * width * item, index_bytes=index,
            query_flops=_query_flops(m, width, config, search),
        )
        plans.append(site)
        disk += cache if store else 0
        extra = max(extra, _site_extra(site, config, store, item))
    if store:
        peak = extra
    else:  # the batches' chunks and their concatenation, then the caches while GPs are built
        total = sum(s.cache_bytes for s in plans)
        peak = max(2 * total, total + extra)
    return Plan(n_train, tuple(plans), store, store_dtype, peak, disk)


def _index(rows: int, width: int, config: GPConfig) -> tuple[str, int]:
    """The back end at this size and its memory."""
    if config.conditioning is Conditioning.EXACT:
        return "exact conditioning", rows * rows * width * 8  # d Gram factors of N x N
    backend = config.search
    if backend is SearchBackend.AUTO:
        backend = SearchBackend.TORCH if rows <= AUTO_EXACT_MAX_ROWS else SearchBackend.IVF
    vectors = rows * width * 4
    if backend is SearchBackend.TORCH:
        return "torch (exact)", rows * 4  # the rows themselves are the conditioning set
    if backend is SearchBackend.FAISS:
        return "faiss (exact)", vectors
    if backend is SearchBackend.IVF:
        nlist = _nlist(rows)
        return f"ivf (nlist {nlist})", vectors + rows * 8 + nlist * width * 4
    return f"hnsw (M {HNSW_M})", vectors + rows * HNSW_M * 2 * 4


def _nlist(rows: int) -> int:
    return int(max(1, min(round(4 * math.sqrt(rows)), rows // 39)))


def _query_flops(rows: int, width: int, config: GPConfig, search: str) -> int:
    k = config.k
    if config.conditioning is Conditioning.EXACT:
        return rows * rows * width  # a triangular solve per unit
    if search.startswith("ivf"):
        nlist = _nlist(rows)
        visited = nlist + ASSUMED_NPROBE * math.ceil(rows / nlist)
    elif search.startswith("hnsw"):
        visited = ASSUMED_EF_SEARCH * HNSW_M
    else:
        visited = rows
    conditioning = width * (1 if k == 1 else k**3 // 3 + k * k)  # closed form, or a Cholesky
    return visited * width + conditioning


def _site_extra(site: SitePlan, config: GPConfig, store: bool, item: int) -> int:
    """Memory building one site's GP needs beyond a cache held in memory."""
    rows_bytes = site.cache_rows * site.width * item
    whole = config.m is None or site.conditioning_rows >= site.cache_rows
    if whole:  # the rows scaled and unscaled, and the index over them (from a store: read too)
        return (3 if store else 2) * rows_bytes + site.index_bytes
    if store:  # one shard at a time (read, scaled, float32), the k-means sample, the centroids
        shard = min(SHARD_ROWS, site.cache_rows) * site.width * item * 3
        sample = min(site.cache_rows, KMEANS_ROWS_PER_CENTROID * site.conditioning_rows)
        return shard + sample * site.width * (item + 4) + site.conditioning_bytes
    return rows_bytes  # the scaled copy k-means reads


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
