"""``gapa-bench classification``: GAPA and its peers on one frozen image classifier, over seeds.

Every method maps images to class probabilities; all are scored by :mod:`gapa_bench.metrics` on the
test set (accuracy, NLL, ECE, Brier), on out-of-distribution sets (AUROC and FPR at 95% TPR of
the OOD score, the predictive entropy unless the method has its own) and on rotated copies of a
test subset (the shift curves). Post-hoc methods share the frozen backbone of each seed; MC
dropout and the ensemble train their own networks with the same settings
(:mod:`gapa_bench.classifiers`). ``test_s`` times one pass over the test set.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gapa.core import GAPA
from gapa.errors import ConfigurationError, MissingDependencyError
from gapa.predictive.classification import OODScore, fit_temperature

from . import bench
from .baselines import FitFn, Fitted
from .baselines.dropout import fit_mc_dropout_classifier
from .baselines.ella import fit_ella_classifier
from .baselines.ensemble import fit_ensemble_classifier
from .baselines.knn import fit_knn
from .baselines.laplace import fit_lla_kfac_classifier, fit_lla_lastlayer_classifier
from .bench import mean_se, write_records
from .classifiers import cached_classifier, logits
from .data.images import ROTATION_ANGLES, ImageData, load_mnist, rotated, subset
from .errors import NotApplicableError
from .metrics import classification_report, ood_report

#: GAPA as the classification benchmark runs it: the activation feeding the head, the 1-NN
#: closed form over 2048 k-means inducing points (on the Fashion-MNIST MLP, 512 -> 2048 raised
#: the MNIST AUROC from 0.993 to 0.996 for 1 s more at test; 8192 and the whole cache gained no
#: more; benchmarks/RESULTS.md), the one-pass propagation (exact under the
#: model from the last activation through pooling and the linear head), whole images as queries
#: (a ResNet's last feature map is compared image to image, not pixel to pixel: OOD AUROC 0.96
#: against 0.57 on Fashion-MNIST vs MNIST; no change for the MLP) and the argmax-preserving
#: probit with its variance scale and lengthscale factor fitted on validation.
GAPA_CLASSIFIER_DEFAULT = {"layers": "auto", "k": 1, "m": 2048, "propagation": "diagonal",
                           "queries": "per_input"}


def fit_map(backbone: nn.Module, data: ImageData, **_) -> Fitted:
    """The frozen network's softmax."""
    return Fitted(lambda x: torch.softmax(logits(backbone, x), -1))


def fit_temperature_scaling(backbone: nn.Module, data: ImageData, **_) -> Fitted:
    """The network's logits divided by one temperature fitted on validation NLL (Guo et al.)."""
    fit = fit_temperature(logits(backbone, data.x_val), data.y_val)
    return Fitted(lambda x: torch.softmax(logits(backbone, x) / fit.temperature, -1),
                  info={"temperature": fit.temperature})


def fit_gapa(backbone: nn.Module, data: ImageData, *, seed: int = 0, progress: bool = False,
             train: dict | None = None, ood_score: str = OODScore.TOTAL_VARIANCE,
             **options) -> Fitted:
    """GAPA on the training images, calibrated on validation as a user would
    (:meth:`gapa.GAPA.calibrate_classifier`); ``options`` go to :class:`gapa.GAPA`.

    Its OOD score is the summed logit variance, the epistemic part alone; the predictive
    entropy, which also counts how much the classes overlap where the network was trained, is
    recorded beside it (``ood_entropy``)."""
    gm = GAPA(backbone, seed=seed, **options).fit(data.x_train, progress=progress)
    fit = gm.calibrate_classifier(data.x_val, data.y_val)
    cache: dict = {}

    def classify(x: torch.Tensor):
        if cache.get("x") is not x:  # predict and ood_score of one input share one pass
            cache.update(x=x, out=gm.classify(x, ood_score=ood_score))
        return cache["out"]

    info = {"layers": gm.layers, "k": gm.config.k, "m": gm.config.m,
            "propagation": gm.propagation, "lengthscale_factor": gm.lengthscale_factor,
            "variance_scale": fit.scale, "val_nll": fit.nll, "val_nll_map": fit.map_nll,
            "ood_score": OODScore(ood_score).value}
    return Fitted(lambda x: classify(x).probs, info=info, handle=gm,
                  ood_score=lambda x: classify(x).ood_score)


METHODS: dict[str, FitFn] = {
    "map": fit_map,
    "temperature": fit_temperature_scaling,
    "lla_lastlayer": fit_lla_lastlayer_classifier,
    "lla_kfac": fit_lla_kfac_classifier,
    "ella": fit_ella_classifier,
    "mc_dropout": fit_mc_dropout_classifier,
    "ensemble": fit_ensemble_classifier,
    "knn": fit_knn,
    "gapa": partial(fit_gapa, **GAPA_CLASSIFIER_DEFAULT),
    # the library's defaults, untouched (what GAPA(model).fit(x) gives), and the control with
    # no conditioning: gapa - gapa_prior is what the GP activation adds
    "gapa_default": fit_gapa,
    "gapa_prior": partial(fit_gapa, **{**GAPA_CLASSIFIER_DEFAULT, "conditioning": "prior"}),
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
    """One method's scores on one seed, and what the figures need."""

    method: str
    seed: int
    accuracy: float
    nll: float
    ece: float
    brier: float
    ood: dict[str, dict[str, float]]  # by the method's own OOD score
    rotated: dict[int, dict[str, float]]
    fit_s: float
    test_s: float
    dataset: str = ""
    backbone: str = ""
    info: dict = field(default_factory=dict)
    #: by the predictive entropy, for methods whose own OOD score is another (GAPA, kNN)
    ood_entropy: dict[str, dict[str, float]] = field(default_factory=dict)
    probs: torch.Tensor | None = field(default=None, repr=False)  # test set
    scores: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # "test", OOD sets

    def record(self) -> dict:
        keys = ("dataset", "backbone", "method", "seed", "accuracy", "nll", "ece", "brier",
                "ood", "ood_entropy", "rotated", "fit_s", "test_s", "info")
        return {k: getattr(self, k) for k in keys}


def run_method(name: str, fit: FitFn, backbone: nn.Module, data: ImageData, sets: EvalSets, *,
               seed: int = 0, progress: bool = False, train: dict | None = None) -> ClassResult:
    """Fit, then score on every evaluation set. ``fit_s`` is the fit call (or the recorded
    training time of methods that train networks); ``test_s`` one pass over the test set, after
    a warm-up call on eight images."""
    t0 = time.perf_counter()
    fitted = fit(backbone, data, seed=seed, progress=progress, train=dict(train or {}))
    fit_s = time.perf_counter() - t0 if fitted.fit_s is None else fitted.fit_s
    fitted.predict(sets.x_test[:8].clone())  # warm-up: the first call of a process pays set-up
    t0 = time.perf_counter()
    probs = fitted.predict(sets.x_test)
    test_s = time.perf_counter() - t0
    entropy = {"test": _entropy(probs)}
    own = {} if fitted.ood_score is None else {"test": fitted.ood_score(sets.x_test)}
    for set_name, x in sets.ood.items():
        if own:
            own[set_name] = fitted.ood_score(x)
        entropy[set_name] = _entropy(fitted.predict(x))
    scores = own or entropy

    def reports(s: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        return {k: ood_report(s["test"], v) for k, v in s.items() if k != "test"}

    shifted = {}
    for angle, (x, y) in sets.rotated.items():
        report = classification_report(fitted.predict(x), y)
        shifted[angle] = {k: report[k] for k in ("accuracy", "nll", "ece")}
    return ClassResult(name, seed, **classification_report(probs, sets.y_test), ood=reports(scores),
                       ood_entropy=reports(entropy) if own else {}, rotated=shifted, fit_s=fit_s,
                       test_s=test_s, dataset=data.name, info=fitted.info, probs=probs,
                       scores=scores)


def run_benchmark(
    data: ImageData,
    arch: str,
    methods: Sequence[str],
    seeds: int = 3,
    *,
    sets: EvalSets | None = None,
    train: dict | None = None,
    progress: bool = True,
    json_path: str | os.PathLike | None = None,
    log=print,
) -> list[ClassResult]:
    """Each method on each seed's backbone (trained once, cached). With ``json_path`` the
    records are rewritten after every result; a method whose optional dependency is missing, or
    that does not apply to the backbone (all-weights KFAC on the ResNet), is reported and
    skipped, never faked."""
    if seeds < 1:
        raise ConfigurationError(f"seeds must be >= 1, got {seeds}")
    sets = sets or eval_sets(data)
    train = {"arch": arch, **(train or {})}
    results: list[ClassResult] = []
    backbones: dict[int, nn.Module] = {}
    for name in methods:
        for seed in tqdm(range(seeds), desc=name, disable=not progress):
            if seed not in backbones:
                backbones[seed] = cached_classifier(data, seed=seed, progress=progress, **train)[0]
            try:
                res = run_method(name, METHODS[name], backbones[seed], data, sets, seed=seed,
                                 progress=progress, train=train)
            except (MissingDependencyError, NotApplicableError) as exc:
                log(f"{name}: skipped ({exc})")
                break
            res.backbone = arch
            results.append(res)
            if json_path is not None:
                write_records(json_path, results)
    return results


def parse_methods(spec: str | Sequence[str] | None) -> list[str]:
    """``None`` or ``"all"`` for every method, else a comma-separated list of known names."""
    return bench.parse_methods(spec, METHODS)


#: Summary columns: (header, how to read it from a result, higher is better).
_COLUMNS = [
    ("acc", lambda r: r.accuracy, True),
    ("NLL", lambda r: r.nll, False),
    ("ECE", lambda r: r.ece, False),
    ("Brier", lambda r: r.brier, False),
]


def summary_table(results: Sequence[ClassResult]) -> str:
    """Markdown: mean ± standard error over seeds per method (in :data:`METHODS` order, variants
    after), the best mean per column in bold;
    AUROC / FPR95 per OOD set, mean NLL and ECE over the rotation angles, costs, and the test
    time relative to MAP's ("—" when MAP was not run)."""
    columns = list(_COLUMNS)
    for set_name in results[0].ood if results else ():
        columns += [(f"AUROC {set_name}", lambda r, s=set_name: r.ood[s]["auroc"], True),
                    (f"FPR95 {set_name}", lambda r, s=set_name: r.ood[s]["fpr95"], False)]
    if results and results[0].rotated:
        columns += [("rot. NLL", lambda r: np.mean([v["nll"] for v in r.rotated.values()]), False),
                    ("rot. ECE", lambda r: np.mean([v["ece"] for v in r.rotated.values()]), False)]
    columns += [("fit s", lambda r: r.fit_s, False), ("test s", lambda r: r.test_s, False)]
    seen = list(dict.fromkeys(r.method for r in results))
    order = list(METHODS)
    methods = sorted(seen, key=lambda m: (order.index(m) if m in order else len(order),
                                          seen.index(m)))
    stats = {m: [mean_se([get(r) for r in results if r.method == m]) for _, get, _ in columns]
             for m in methods}
    best = [(max if hi else min)(stats[m][i][0] for m in methods)
            for i, (_, _, hi) in enumerate(columns)]
    map_test = stats["map"][-1][0] if "map" in stats else None
    head = ["method", "seeds", *[c[0] for c in columns], "test / map"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        n = sum(r.method == m for r in results)
        cells = [m, str(n)]
        for i, (header, _, _) in enumerate(columns):
            mean, se = stats[m][i]
            digits = 1 if header.endswith(" s") else 4
            text = f"{mean:.{digits}f} ± {se:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"
            cells.append(f"**{text}**" if mean == best[i] and len(methods) > 1 else text)
        cells.append(f"{stats[m][-1][0] / map_test:.2f}x" if map_test else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_records(*paths: str | os.PathLike) -> list[ClassResult]:
    """The results of one or more :func:`write_records` files, for :func:`summary_table`
    (without the per-input tensors, so no figures)."""
    results = []
    for path in paths:
        with open(path) as f:
            for rec in json.load(f):
                rec["rotated"] = {int(a): v for a, v in rec["rotated"].items()}
                results.append(ClassResult(**rec))
    return results


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(probs, probs).sum(-1)
