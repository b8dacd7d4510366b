"""``gapa-bench regression``: every method of the paper's table on one data set, over seeds.

Post-hoc methods share one frozen MAP backbone per seed (MLP 3 x 200 tanh, cached on disk);
methods that train networks (MC dropout, ensembles) train them with the same settings. All are
calibrated on validation the same way (:func:`gapa_bench.regression.run_method`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from gapa.errors import ConfigurationError, MissingDependencyError
from gapa.io import atomic_path

from . import report
from .backbones import cached_regressor
from .baselines import FitFn
from .baselines.dropout import DROPOUT_RATES, fit_mc_dropout
from .baselines.ella import fit_ella
from .baselines.ensemble import fit_ensemble
from .baselines.laplace import fit_lla_diag, fit_lla_kfac, fit_lla_lastlayer
from .baselines.valla import fit_valla
from .data import RegressionData
from .provenance import run_info
from .regression import MethodResult, fit_gapa, fit_map, run_method, selected

#: GAPA as the demo runs it: the middle hidden activation of the 3-layer MLP, 1-NN closed form
#: over 512 k-means inducing points and the exact first-order (Jacobian) propagation, one
#: backward pass for the scalar output, which keeps the correlations the next mixing layer
#: creates (RQ5 in RESULTS.md). The benchmark does not use it: it chooses on validation.
GAPA_DEFAULT = {"layers": ["3"], "k": 1, "m": 512, "propagation": "jacobian"}

#: What the benchmark's ``gapa`` chooses from, on validation NLL inside every run
#: (:func:`gapa_bench.regression.selected`): the hidden activation (modules "1", "3", "5" of the
#: 3 x 200 tanh MLP) and the inducing points; the lengthscale factor is chosen on validation by
#: ``GAPA.calibrate`` from :data:`LENGTHSCALE_CANDIDATES`.
GAPA_CANDIDATES = {"layers": [["1"], ["3"], ["5"]], "m": [256, 1024]}
#: Settings every candidate shares: the 1-NN closed form and the Jacobian propagation.
GAPA_FIXED = {"k": 1, "propagation": "jacobian"}
#: Lengthscale factors the benchmark's GAPA rows try: the library's set widened by four
#: octaves below, because validation chose the library's smallest factor on most flights runs.
LENGTHSCALE_CANDIDATES = tuple(2.0 ** e for e in range(-8, 4))

METHODS: dict[str, FitFn] = {
    "map": fit_map,
    "lla_diag": fit_lla_diag,
    "lla_kfac": fit_lla_kfac,
    "lla_lastlayer": fit_lla_lastlayer,
    "ella": fit_ella,
    # VaLLA (Ortega et al., ICML 2024) with M = 100 and 200 inducing inputs
    "valla_100": partial(fit_valla, m=100),
    "valla_200": partial(fit_valla, m=200),
    "mc_dropout": selected(fit_mc_dropout, {"p": list(DROPOUT_RATES)}),
    "ensemble": fit_ensemble,
    "gapa": selected(fit_gapa, GAPA_CANDIDATES, **GAPA_FIXED,
                     lengthscale_factors=LENGTHSCALE_CANDIDATES),
    # the library's own defaults, untouched: what a user gets with GAPA(model).fit(x)
    "gapa_default": fit_gapa,
    # the control: the same propagation with no conditioning (every unit at its prior
    # amplitude), its layer chosen on validation as gapa's is; gapa - gapa_prior is what
    # conditioning on the training activations adds
    "gapa_prior": selected(fit_gapa, {"layers": GAPA_CANDIDATES["layers"]}, **GAPA_FIXED,
                           conditioning="prior", lengthscale_factors=None),
    # the second control: conditioning on M random training rows instead of k-means centroids
    "gapa_random": selected(fit_gapa, GAPA_CANDIDATES, **GAPA_FIXED, inducing="random",
                            lengthscale_factors=LENGTHSCALE_CANDIDATES),
}

def parse_methods(spec: str | Sequence[str] | None, known: dict | None = None) -> list[str]:
    """``None`` or ``"all"`` for every method of ``known`` (default: the regression ones),
    else a comma-separated list of known names."""
    known = METHODS if known is None else known
    if spec is None or spec == "all":
        return list(known)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigurationError(
            f"unknown method(s) {unknown or names}; choose from {', '.join(known)} or 'all'"
        )
    return names


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """``N`` as seeds 0..N-1, or a sequence of distinct non-negative seeds as given.

    Raises
    ------
    ConfigurationError
        For N < 1, an empty sequence, a negative or repeated seed.
    """
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigurationError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigurationError(f"seeds must be distinct non-negative integers, got {seeds}")
    return seeds


def run_benchmark(
    data: RegressionData,
    methods: Sequence[str],
    seeds: int | Sequence[int] = 5,
    *,
    train: dict | None = None,
    progress: bool = True,
    json_path: str | os.PathLike | None = None,
    resume: bool = False,
    log=print,
    data_for_seed: Callable[[int], RegressionData] | None = None,
) -> list[MethodResult]:
    """Each method on each seed; the backbone of seed ``s`` is trained once (cached on disk) and
    loaded once per run. ``seeds``: N for seeds 0..N-1, or the seeds themselves (to share a run
    between processes, each with its own ``json_path``).

    ``data_for_seed(s)``: the data of repetition ``s`` when repetitions differ in their data
    too (a shuffled split draws shuffle ``s``), so that seeds are independent repetitions; by
    default every seed uses ``data``.

    With ``json_path`` the records are rewritten after every result, so an interrupted run keeps
    what it finished; with ``resume`` the records already in that file for this data set and
    split are kept and their method/seed pairs are not run again. A method whose optional
    dependency is missing (laplace-torch) is reported and skipped, never faked.
    """
    seeds = seed_list(seeds)
    if resume and json_path is None:
        raise ConfigurationError("resume needs the JSON path whose records it keeps")
    train = dict(train or {})
    results: list[MethodResult] = []
    if resume and os.path.exists(json_path):
        results = [r for r in load_records(json_path)
                   if (r.dataset, r.split) == (data.name, data.split)]
    done = {(r.method, r.seed) for r in results}
    run = run_info()
    backbones: dict[int, nn.Module] = {}
    datasets: dict[int, RegressionData] = {}

    def data_of(seed: int) -> RegressionData:
        if data_for_seed is None:
            return data
        if seed not in datasets:
            datasets[seed] = data_for_seed(seed)
        return datasets[seed]

    for name in methods:
        bar = tqdm(seeds, desc=name, disable=not progress)
        for seed in bar:
            if (name, seed) in done:
                continue
            if seed not in backbones:
                backbones[seed] = cached_regressor(data_of(seed), seed=seed, progress=progress,
                                                   **train)[0]
            backbone = backbones[seed]
            try:
                res = run_method(name, METHODS[name], backbone, data_of(seed), seed=seed,
                                 progress=progress, train=train)
            except MissingDependencyError as exc:
                log(f"{name}: skipped ({exc})")
                break
            res.fitted = None  # release the fitted state: only the scores are kept
            res.run = run
            results.append(res)
            if json_path is not None:
                write_records(json_path, results)
            bar.set_postfix(nll=f"{res.nll:.3f}")
    return results


def summary_table(results: Sequence[MethodResult]) -> str:
    """Markdown: mean ± standard error over seeds per method, the best mean per column in bold,
    and the test time over MAP's ("—" without MAP): :func:`gapa_bench.report.table`, the table
    RESULTS.md is regenerated with."""
    return report.table([r.record() for r in results], report.REGRESSION_COLUMNS)


def write_records(path: str | os.PathLike, results: Sequence) -> None:
    """One JSON record per method and seed, written aside then renamed."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump([r.record() for r in results], f, indent=2)


def load_records(path: str | os.PathLike) -> list[MethodResult]:
    """The results of a :func:`write_records` file, without the per-row predictions."""
    with open(path) as f:
        return [MethodResult(**rec, mean=torch.empty(0), std=torch.empty(0))
                for rec in json.load(f)]
