"""``gapa-bench classification``: GAPA and its peers on one frozen image classifier, over seeds.

Every method maps images to class probabilities; all are scored by :mod:`gapa_bench.metrics` on the
test set (accuracy, NLL, ECE, Brier), on out-of-distribution sets and on rotated copies of a test
subset (the shift curves). Out of distribution, every method is scored alike by every score it
has (AUROC and FPR at 95% TPR of each): the predictive entropy and ``1 - max prob`` of its
probabilities, which every method has, and its epistemic score if it has one (summed logit
variance, mutual information or neighbour distance; :mod:`gapa_bench.baselines.scores`). Every
method with logit moments (GAPA, both Laplace flavours, ELLA) gets one variance scale fitted on
validation NLL and one predictive. Every setting a method chooses is chosen on the validation
split from candidates declared in code (:mod:`gapa_bench.selection`) and recorded. Post-hoc
methods share the frozen backbone of each seed; MC dropout and the ensemble train their own
networks with the same settings (:mod:`gapa_bench.classifiers`). ``test_s`` times one pass over
the test set giving the probabilities and every score.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from gapa.core import GAPA
from gapa.errors import ConfigurationError, MissingDependencyError
from gapa.predictive.classification import ClassPrediction, VarianceScaleFit, fit_temperature

from . import bench, report
from .baselines import FitFn, Fitted
from .baselines.dropout import fit_mc_dropout_classifier
from .baselines.ella import fit_ella_classifier
from .baselines.ensemble import fit_ensemble_classifier
from .baselines.knn import fit_knn
from .baselines.laplace import fit_lla_kfac_classifier, fit_lla_lastlayer_classifier
from .baselines.scores import check_ood_scores, last_pass, probability_scores
from .baselines.valla import fit_valla_classifier
from .bench import write_records
from .classifiers import cached_classifier, logits
from .data.images import ROTATION_ANGLES, ImageData, load_mnist, rotated, subset
from .errors import NotApplicableError
from .metrics import classification_report, ood_report
from .provenance import run_info
from .selection import select

#: GAPA's settings in the classification benchmark that are not chosen: the activation feeding
#: the head, the 1-NN closed form and the one-pass propagation (exact under the model from the
#: last activation through pooling and the linear head).
GAPA_CLASSIFIER_FIXED = {"layers": "auto", "k": 1, "propagation": "diagonal"}
#: GAPA's candidates, chosen per seed on validation NLL after
#: :meth:`gapa.GAPA.calibrate_classifier` (cheaper first: ties keep the earlier). The inducing
#: points: on the Fashion-MNIST MLP 512 -> 2048 raised the MNIST AUROC from 0.993 to 0.996 for
#: 1 s more at test, and 8192 or the whole cache gained no more (benchmarks/HISTORY.md). The
#: queries: whole images or every position of the last feature map (on the ResNet whole images
#: gave OOD AUROC 0.96 against 0.57; that was a test number, so validation NLL decides here).
#: On a layer without positions (the MLP's 2-D activation) the two are the same GAPA and only
#: the first is fitted (:func:`gapa_candidates`).
GAPA_CLASSIFIER_CANDIDATES = {"m": [512, 2048], "queries": ["per_input", "per_position"]}


def fit_map(backbone: nn.Module, data: ImageData, **_) -> Fitted:
    """The frozen network's softmax."""
    return Fitted(lambda x: torch.softmax(logits(backbone, x), -1))


def fit_temperature_scaling(backbone: nn.Module, data: ImageData, **_) -> Fitted:
    """The network's logits divided by one temperature fitted on validation NLL (Guo et al.)."""
    fit = fit_temperature(logits(backbone, data.x_val), data.y_val)
    return Fitted(lambda x: torch.softmax(logits(backbone, x) / fit.temperature, -1),
                  info={"temperature": fit.temperature})


def gapa_candidates(backbone: nn.Module, x: torch.Tensor,
                    candidates: Mapping[str, Sequence] = GAPA_CLASSIFIER_CANDIDATES,
                    **fixed) -> dict[str, list]:
    """``candidates`` with the ``queries`` values after the first dropped when every GAPA layer
    (resolved from ``fixed["layers"]`` as :class:`gapa.GAPA` does) outputs ``(N, units)``: there
    per-input and per-position queries are the same rows, so a second fit would only repeat the
    first. ``x`` is one input or more, run once through ``backbone`` to see the shapes."""
    out = {k: list(v) for k, v in candidates.items()}
    if len(out.get("queries", ())) < 2:
        return out
    modules = dict(backbone.named_modules())
    shapes: list[torch.Size] = []
    hooks = [modules[name].register_forward_hook(lambda _m, _i, o: shapes.append(o.shape))
             for name in GAPA(backbone, layers=fixed.get("layers", "auto")).layers]
    try:
        with torch.no_grad():
            backbone(x[:1])
    finally:
        for hook in hooks:
            hook.remove()
    if all(len(shape) == 2 for shape in shapes):
        out["queries"] = out["queries"][:1]
    return out


def gapa_fitted(gm: GAPA, fit: VarianceScaleFit, info: dict,
                predict: Mapping | None = None) -> Fitted:
    """The benchmarks' view of a calibrated GAPA: probabilities and the summed raw logit
    variance (the epistemic part alone) from one :meth:`gapa.GAPA.classify` pass per input
    (``predict``: its keyword arguments, for example a class axis and a batch size)."""
    predict = dict(predict or {})

    @last_pass
    def classify(x: torch.Tensor) -> ClassPrediction:
        return gm.classify(x, **predict)

    def probs(x: torch.Tensor) -> torch.Tensor:
        return classify(x).probs

    def variance(x: torch.Tensor) -> torch.Tensor:
        return classify(x).total_logit_variance

    info = {"layers": gm.layers, "k": gm.config.k, "m": gm.config.m,
            "queries": gm.queries.value, "search": gm.config.search.value,
            "conditioning": gm.config.conditioning.value,
            "propagation": gm.propagation, "lengthscale_factor": gm.lengthscale_factor,
            "lengthscale_rule": gm.config.lengthscale_rule.value,
            "amplitude_rule": gm.config.amplitude_rule.value,
            "variance_scale": fit.scale, "val_nll": fit.nll, "val_nll_map": fit.map_nll,
            "predictive": fit.method.value, **info}
    return Fitted(probs, info=info, handle=gm, ood_scores={"logit_variance": variance})


def fit_calibrated(model: nn.Module, x_train: torch.Tensor, x_val: torch.Tensor,
                   y_val: torch.Tensor, *, seed: int, progress: bool,
                   predict: Mapping | None = None, **options) -> tuple[GAPA, VarianceScaleFit]:
    """``GAPA(model, seed=seed, **options)`` fitted on the training inputs and calibrated on
    validation as a user would (:meth:`gapa.GAPA.calibrate_classifier`, with ``predict``)."""
    gm = GAPA(model, seed=seed, **options).fit(x_train, progress=progress)
    return gm, gm.calibrate_classifier(x_val, y_val, **(predict or {}))


def fit_gapa(backbone: nn.Module, data: ImageData, *, seed: int = 0, progress: bool = False,
             train: dict | None = None,
             candidates: Mapping[str, Sequence] = GAPA_CLASSIFIER_CANDIDATES,
             **fixed) -> Fitted:
    """GAPA with each setting of ``candidates`` (:func:`gapa_candidates`) over
    :data:`GAPA_CLASSIFIER_FIXED` updated by ``fixed``, each fitted on the training images and
    calibrated on validation; the one of lowest calibrated validation NLL is kept
    (:func:`gapa_bench.selection.select`, recorded as ``info["selection"]``). ``train`` is
    unused (post hoc)."""
    fixed = {**GAPA_CLASSIFIER_FIXED, **fixed}
    tried = gapa_candidates(backbone, data.x_train, candidates, **fixed)

    def fit(setting: dict) -> tuple[float, tuple[GAPA, VarianceScaleFit]]:
        gm, cal = fit_calibrated(backbone, data.x_train, data.x_val, data.y_val, seed=seed,
                                 progress=progress, **fixed, **setting)
        return cal.nll, (gm, cal)

    (gm, cal), selection = select(tried, fit)
    return gapa_fitted(gm, cal, {"selection": selection.record()})


def fit_gapa_default(backbone: nn.Module, data: ImageData, *, seed: int = 0,
                     progress: bool = False, train: dict | None = None) -> Fitted:
    """The library's defaults, untouched: ``GAPA(backbone).fit(x_train)`` and
    :meth:`gapa.GAPA.calibrate_classifier` on validation, nothing chosen."""
    return gapa_fitted(*fit_calibrated(backbone, data.x_train, data.x_val, data.y_val,
                                       seed=seed, progress=progress), {})


METHODS: dict[str, FitFn] = {
    "map": fit_map,
    "temperature": fit_temperature_scaling,
    "lla_lastlayer": fit_lla_lastlayer_classifier,
    "lla_kfac": fit_lla_kfac_classifier,
    "ella": fit_ella_classifier,
    # VaLLA (Ortega et al., ICML 2024) with M = 100 and 200 inducing (input, class) rows
    "valla_100": partial(fit_valla_classifier, m=100),
    "valla_200": partial(fit_valla_classifier, m=200),
    "mc_dropout": fit_mc_dropout_classifier,
    "ensemble": fit_ensemble_classifier,
    "knn": fit_knn,
    "gapa": fit_gapa,
    # the library's defaults, untouched (what GAPA(model).fit(x) gives), and the control with
    # no conditioning, chosen the same way: gapa - gapa_prior is what the GP activation adds
    "gapa_default": fit_gapa_default,
    # (M is no candidate there: without conditioning the inducing points are never read)
    "gapa_prior": partial(fit_gapa, conditioning="prior",
                          candidates={"queries": GAPA_CLASSIFIER_CANDIDATES["queries"]}),
    # chosen as gapa is, with the GP's own hyperparameters (type-II maximum likelihood of each
    # unit's cached activations) instead of the quantile rule
    "gapa_ml": partial(fit_gapa, lengthscale_rule="marginal_likelihood",
                       amplitude_rule="marginal_likelihood"),
}


@dataclass
class EvalSets:
    """What every method is scored on: the test set, OOD inputs and rotated test subsets."""

    x_test: torch.Tensor
    y_test: torch.Tensor
    ood: dict[str, torch.Tensor] = field(default_factory=dict)
    rotated: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def eval_sets(data: ImageData, ood: Sequence[str] = ("mnist", "rotated"), *,
              rotated_size: int = 2000, test_size: int | None = None,
              angles: Sequence[int] = ROTATION_ANGLES) -> EvalSets:
    """``"mnist"``: the 5,000 MNIST digits as OOD inputs; ``"rotated"``: a class-balanced test
    subset of ``rotated_size`` images (seed 0) rotated by each angle. ``test_size`` scores on a
    class-balanced subset of the test set and as many MNIST digits instead (seed 0), for
    methods too slow for the whole sets."""
    unknown = set(ood) - {"mnist", "rotated"}
    if unknown:
        raise ConfigurationError(f"unknown OOD set(s) {sorted(unknown)}; use mnist and/or rotated")
    if test_size is not None:
        data = subset(data, 1, min(test_size, len(data.y_test)), n_val=1)
    sets = EvalSets(data.x_test, data.y_test)
    if "mnist" in ood:
        digits = load_mnist()[0]
        if test_size is not None:
            keep = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
            digits = digits[keep[:test_size].sort().values]
        sets.ood["mnist"] = digits
    if "rotated" in ood:
        size = min(rotated_size, len(data.y_test))
        base = subset(data, 1, size, n_val=1)
        sets.rotated = {a: (rotated(base.x_test, a), base.y_test) for a in angles}
    return sets


@dataclass
class ClassResult:
    """One method's scores on one seed, and what the figures need.

    ``ood_scores[score][ood_set]`` holds ``{"auroc", "fpr95"}`` for every score the method has
    (:data:`gapa_bench.baselines.scores.SCORE_NAMES`); ``own_score`` names its epistemic score
    (``None`` for MAP and temperature); ``run`` is :func:`gapa_bench.provenance.run_info` of the
    benchmark run. ``scores[set][score]`` are the per-input scores (``"test"`` and each OOD
    set), not recorded.
    """

    method: str
    seed: int
    accuracy: float
    nll: float
    ece: float
    brier: float
    ood_scores: dict[str, dict[str, dict[str, float]]]
    rotated: dict[int, dict[str, float]]
    fit_s: float
    test_s: float
    dataset: str = ""
    backbone: str = ""
    info: dict = field(default_factory=dict)
    own_score: str | None = None
    run: dict | None = None
    probs: torch.Tensor | None = field(default=None, repr=False)  # test set
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def headline_score(self) -> str:
        """The score the figures show: the method's own, else the entropy."""
        return self.own_score or "entropy"

    def record(self) -> dict:
        keys = ("dataset", "backbone", "method", "seed", "accuracy", "nll", "ece", "brier",
                "ood_scores", "own_score", "rotated", "fit_s", "test_s", "info", "run")
        return {k: getattr(self, k) for k in keys}


def run_method(name: str, fit: FitFn, backbone: nn.Module, data: ImageData, sets: EvalSets, *,
               seed: int = 0, progress: bool = False, train: dict | None = None) -> ClassResult:
    """Fit, then score on every evaluation set. ``fit_s`` is the fit call (or what the method
    reports: the recorded training time of methods that train networks); ``test_s`` one pass
    over the test set giving the probabilities and every OOD score, after a warm-up call on
    eight images. Entropy and max-prob come from the probabilities, the same code for every
    method; the epistemic score from the method (``Fitted.ood_scores``)."""
    t0 = time.perf_counter()
    fitted = fit(backbone, data, seed=seed, progress=progress, train=dict(train or {}))
    fit_s = time.perf_counter() - t0 if fitted.fit_s is None else fitted.fit_s
    own = check_ood_scores(fitted.ood_scores)

    def score(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        probs = fitted.predict(x)
        out = probability_scores(probs)
        out.update({k: f(x) for k, f in fitted.ood_scores.items()})
        return probs, out

    score(sets.x_test[:8].clone())  # warm-up: the first call of a process pays set-up
    t0 = time.perf_counter()
    probs, test_scores = score(sets.x_test)
    test_s = time.perf_counter() - t0
    scores = {"test": test_scores} | {k: score(x)[1] for k, x in sets.ood.items()}
    ood = {k: {s: ood_report(test_scores[k], scores[s][k]) for s in sets.ood}
           for k in test_scores}
    shifted = {}
    for angle, (x, y) in sets.rotated.items():
        report = classification_report(fitted.predict(x), y)
        shifted[angle] = {k: report[k] for k in ("accuracy", "nll", "ece")}
    return ClassResult(name, seed, **classification_report(probs, sets.y_test), ood_scores=ood,
                       own_score=own, rotated=shifted, fit_s=fit_s, test_s=test_s,
                       dataset=data.name, info=fitted.info, probs=probs, scores=scores)


def run_benchmark(
    data: ImageData,
    arch: str,
    methods: Sequence[str],
    seeds: int | Sequence[int] = 3,
    *,
    sets: EvalSets | None = None,
    train: dict | None = None,
    progress: bool = True,
    json_path: str | os.PathLike | None = None,
    log=print,
) -> list[ClassResult]:
    """Each method on each seed's backbone (trained once, cached; ``seeds``: N for 0..N-1, or
    the seeds themselves, :func:`gapa_bench.bench.seed_list`). With ``json_path`` the
    records are rewritten after every result; a method whose optional dependency is missing, or
    that does not apply to the backbone (all-weights KFAC on the ResNet), is reported and
    skipped, never faked. Every record carries the run's provenance (``run``), taken once."""
    seeds = bench.seed_list(seeds)
    sets = sets or eval_sets(data)
    train = {"arch": arch, **(train or {})}
    run = run_info()
    results: list[ClassResult] = []
    backbones: dict[int, nn.Module] = {}
    for name in methods:
        for seed in tqdm(seeds, desc=name, disable=not progress):
            if seed not in backbones:
                backbones[seed] = cached_classifier(data, seed=seed, progress=progress, **train)[0]
            try:
                res = run_method(name, METHODS[name], backbones[seed], data, sets, seed=seed,
                                 progress=progress, train=train)
            except (MissingDependencyError, NotApplicableError) as exc:
                log(f"{name}: skipped ({exc})")
                break
            res.backbone, res.run = arch, run
            results.append(res)
            if json_path is not None:
                write_records(json_path, results)
    return results


def parse_methods(spec: str | Sequence[str] | None) -> list[str]:
    """``None`` or ``"all"`` for every method, else a comma-separated list of known names."""
    return bench.parse_methods(spec, METHODS)


def summary_table(results: Sequence[ClassResult]) -> str:
    """Markdown: mean ± standard error over seeds per method, the best mean per column in bold;
    per OOD set the AUROC by predictive entropy (the same score for every method) and by the
    method's own score (named in the cell): :func:`gapa_bench.report.classification_table`,
    the table RESULTS.md is regenerated with."""
    return report.classification_table([r.record() for r in results])


def load_records(*paths: str | os.PathLike) -> list[ClassResult]:
    """The results of one or more :func:`write_records` files, for :func:`summary_table`
    (without the per-input tensors, so no figures). Records written before the per-score
    format load too (:func:`gapa_bench.report.upgrade_classification`): with the scores they had (entropy, and the own score
    where it was another), no max-prob."""
    results = []
    for path in paths:
        with open(path) as f:
            for rec in json.load(f):
                rec = report.upgrade_classification(rec)
                rec["rotated"] = {int(a): v for a, v in rec["rotated"].items()}
                results.append(ClassResult(**rec))
    return results
