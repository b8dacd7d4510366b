"""What a fit will cost before anything is allocated: cache, conditioning set, index, memory.

``gm.plan(n_train, example)`` (and ``gapa plan`` on the command line) estimates, per call site,
the size of the activation cache (in memory or on disk), of the conditioning set and of its
neighbour index, the arithmetic per query, and the peak resident memory of the fit, from the
widths one forward pass on ``example`` reveals. ``fit(memory_budget=...)`` refuses a plan that
exceeds the budget. The estimates leave out the model itself and one batch's activations.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from .capture.store import SHARD_BYTES
from .errors import ConfigurationError, MemoryBudgetError
from .gp.kernels import LENGTHSCALE_PAIRS
from .gp.likelihood import ML_CHUNK_ELEMENTS, ML_ROWS
from .gp.search import (
    AUTO_EXACT_MAX_ROWS,
    HNSW_M,
    SearchBackend,
)
from .gp.site import Conditioning, GPConfig

#: Search-time settings assumed before the fit tunes them (the tuned values are reported by
#: ``gm.summary()``): IVF lists probed, HNSW beam width.
ASSUMED_NPROBE = 8
ASSUMED_EF_SEARCH = 64
#: k-means trains on at most this many rows per inducing point (gapa.gp.inducing).
KMEANS_ROWS_PER_CENTROID = 64
FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """Return a memory size in bytes: ``4294967296``, ``"4GiB"``, ``"512 MB"``, ``"1.5e9"``.

    Units are case-insensitive: ``k``/``kb``, ``m``/``mb``, ``g``/``gb``, ``t``/``tb`` are powers
    of 1000, ``kib``, ``mib``, ``gib``, ``tib`` powers of 1024.

    Raises
    ------
    ConfigurationError
        For text that is not a size, or a size that is not finite or is under one byte.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[0-9]+)?)\s*([a-z]*)\s*",
                             str(value).lower())
        if not match or match.group(2) not in _UNITS:
            raise ConfigurationError(
                f"cannot read {value!r} as a size; write bytes or a number with a unit such as "
                "'4GiB', '512MiB' or '2GB'")
        size = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(size) or size < 1:
        raise ConfigurationError(
            f"a memory budget must be a finite size of at least 1 byte, got {value!r}")
    return int(size)


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
    on_disk: bool
    store_dtype: str
    peak_bytes: int  #: resident memory of the fit, excluding the model and a batch's activations
    disk_bytes: int

    def check(self, budget: int | float | str, what: str = "the budget") -> Plan:
        """Refuse a plan whose fit needs more resident memory than ``budget``.

        Parameters
        ----------
        budget : int, float or str
            A size, as :func:`parse_bytes` reads it.
        what : str, default "the budget"
            What the budget is, for the message.

        Returns
        -------
        Plan
            The plan itself, when it fits.

        Raises
        ------
        MemoryBudgetError
            The fit's peak memory exceeds the budget; the message shows the plan.
        ConfigurationError
            ``budget`` is not a size.
        """
        limit = parse_bytes(budget)
        if self.peak_bytes > limit:
            hint = ("" if self.on_disk else "; fit(..., store=DIR) keeps the cache on disk")
            raise MemoryBudgetError(
                f"the fit needs about {_size(self.peak_bytes)} of resident memory, over "
                f"{what} of {_size(limit)}{hint}; or lower m, or cache fewer layers\n{self}")
        return self

    def __str__(self) -> str:
        """Return the plan as a table, one row per call site, and the fit's peak and disk use."""
        where = f"on disk ({self.store_dtype})" if self.on_disk else "in memory"
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


def machine_memory(device: torch.device) -> int | None:
    """Return the bytes of memory of ``device`` (this machine's RAM for the CPU).

    None where the system does not say.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def plan_fit(
    n_train: int, sites: dict[str, tuple[int, int]], config: GPConfig, *, on_disk: bool = False,
    store_dtype: str = "float32", compute_dtype: str = "float32",
) -> Plan:
    """Estimate the cost of fitting on ``n_train`` inputs.

    Parameters
    ----------
    n_train : int
        Training inputs.
    sites : dict of str to (int, int)
        Each call site's ``(width, queries per input)``: 1 query for an MLP or
        ``queries="per_input"``, H x W for a feature map's positions.
    config : GPConfig
        The options of the fit.
    on_disk : bool
        Whether the cache streams to an activation store on disk.
    store_dtype : {"float32", "float16"}
        The store's dtype on disk.
    compute_dtype : str
        The model's dtype (a key of :data:`FLOAT_BYTES`).

    Returns
    -------
    Plan

    Raises
    ------
    ConfigurationError
        For values no fit could have, such as more neighbours than conditioning rows.
    """
    _check_plan_arguments(n_train, sites, config, store_dtype, compute_dtype)
    item = FLOAT_BYTES[compute_dtype]
    plans = []
    for key, (width, per_input) in sites.items():
        n = n_train * per_input
        m = n if config.m is None else min(config.m, n)
        search, index = _index(n if config.m is None else m, width, config)
        plans.append(SitePlan(
            key=key, width=width, cache_rows=n, conditioning_rows=m, search=search,
            cache_bytes=n * width * (FLOAT_BYTES[store_dtype] if on_disk else item),
            conditioning_bytes=m * width * item, index_bytes=index,
            query_flops=_query_flops(m, width, config, search),
        ))
    peak = _peak(plans, config, on_disk, item)
    disk = sum(s.cache_bytes for s in plans) if on_disk else 0
    return Plan(n_train, tuple(plans), on_disk, store_dtype, peak, disk)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_plan_arguments(n_train, sites, config, store_dtype, compute_dtype) -> None:
    if not _is_count(n_train):
        raise ConfigurationError(f"n_train must be a positive integer, got {n_train!r}")
    if store_dtype not in ("float32", "float16"):
        raise ConfigurationError(f"store_dtype must be float32 or float16, got {store_dtype!r}")
    if compute_dtype not in FLOAT_BYTES:
        raise ConfigurationError(
            f"compute_dtype must be one of {', '.join(FLOAT_BYTES)}, got {compute_dtype!r}")
    if not isinstance(config, GPConfig):
        raise ConfigurationError(
            f"config must be a gapa.gp.site.GPConfig, got {type(config).__name__}")
    if not _is_count(config.k):
        raise ConfigurationError(f"k must be a positive integer, got {config.k!r}")
    if config.m is not None and not _is_count(config.m):
        raise ConfigurationError(f"m must be a positive integer or None, got {config.m!r}")
    if not isinstance(sites, dict) or not sites:
        raise ConfigurationError("sites must map at least one call site to (width, queries per "
                                 f"input), got {sites!r}")
    for key, spec in sites.items():
        if not (isinstance(spec, tuple | list) and len(spec) == 2 and all(map(_is_count, spec))):
            raise ConfigurationError(f"site {key!r}: (width, queries per input) must be two "
                                     f"positive integers, got {spec!r}")
        rows = n_train * spec[1]
        rows = rows if config.m is None else min(config.m, rows)
        if config.conditioning is Conditioning.LOCAL and config.k > rows:
            raise ConfigurationError(
                f"k={config.k} neighbours exceed the {rows:,} conditioning rows of site {key!r} "
                f"(m={config.m}, {n_train:,} inputs x {spec[1]} queries each); lower k")


def _peak(sites: list[SitePlan], config: GPConfig, on_disk: bool, item: int) -> int:
    """Peak resident bytes of the capture and of building the GPs (gapa.core, gapa.gp.site)."""
    whole = config.m is None
    full = [s.cache_rows * s.width * item for s in sites]  # each cache in the model's dtype
    # kept after the build: the conditioning rows, their scaled copy and the index
    kept = sum(2 * s.conditioning_bytes + s.index_bytes for s in sites)
    # the lengthscale rule: sampled pair differences in float64 and the quantile's sort, or
    # the marginal likelihood's float64 Gram matrices (differences, kernel, Cholesky factor)
    pairs = max(LENGTHSCALE_PAIRS * s.width * 8 * 3 for s in sites)
    if "marginal_likelihood" in (config.lengthscale_rule, config.amplitude_rule):
        pairs = max(pairs, 3 * 8 * min(ML_CHUNK_ELEMENTS, max(s.width for s in sites) * ML_ROWS**2))
    # The capture's batch-sized chunks, once freed, mostly stay in the process (glibc keeps
    # them in its heap: measured in benchmarks/fit_scale.py), so the capture's peak is added to
    # the build's rather than compared with it.
    if on_disk:
        # capture: one shard of every site as batch chunks and their concatenation
        shard = min(SHARD_BYTES * item // 4, sum(full))
        capture = 2 * shard
        if whole:  # every cache is read back whole (chunks and their concatenation)
            return capture + kept + max(full) + pairs
        # one site at a time: a shard read, scaled and cast for statistics and k-means counts
        # (about 6 copies), the k-means sample and its scaled float32 copy
        sample = max(min(s.cache_rows, KMEANS_ROWS_PER_CENTROID * s.conditioning_rows) * s.width
                     for s in sites)
        return capture + kept + max(6 * shard + sample * (2 * item + 4), pairs)
    total = sum(full)  # in memory: the chunks, then every cache until the GPs are built
    if whole:  # the caches are the conditioning rows: only their scaled copies and indexes add
        return 2 * total + kept - sum(s.conditioning_bytes for s in sites) + pairs
    return 2 * total + max(full) + kept + pairs  # + one site's scaled copy for k-means


def _index(rows: int, width: int, config: GPConfig) -> tuple[str, int]:
    """Return the back end at this size and its memory."""
    if config.conditioning is Conditioning.EXACT:
        return "exact conditioning", rows * rows * width * 8  # d Gram factors of N x N
    backend = config.search
    if backend is SearchBackend.AUTO:
        backend = SearchBackend.EXACT if rows <= AUTO_EXACT_MAX_ROWS else SearchBackend.IVF
    vectors = rows * width * 4
    if backend is SearchBackend.TORCH:
        return "torch (exact)", rows * 4  # the rows themselves are the conditioning set
    if backend is SearchBackend.EXACT:  # torch's norms and, on the CPU, faiss's float32 copy
        return "exact (torch or faiss)", rows * 4 + vectors
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


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
