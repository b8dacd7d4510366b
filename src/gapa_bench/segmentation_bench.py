"""``gapa-bench segmentation``: GAPA and its peers on a frozen U-Net, per pixel, over seeds.

Every method maps scenes ``(N, 1, H, W)`` to per-pixel class probabilities ``(N, C, H, W)`` and
is scored on the pixels of the test scenes (accuracy, mIoU, NLL, ECE, Brier), on the pixels of
the out-of-distribution scenes (AUROC and FPR at 95% TPR, the unknown objects' pixels against
every other pixel of the same scenes, by every score the method has) and on shifted test scenes
(NLL and ECE against the strength of noise, blur and contrast loss). As in the classification
benchmark (:mod:`gapa_bench.classification_bench`), every method with logit moments gets one
variance scale fitted on validation NLL and the argmax-preserving predictive, so that no
predicted label changes; every choice is made on validation from candidates declared here.

Methods: ``map``; ``temperature``; ``mc_dropout`` (the U-Net trained with channel dropout);
``ensemble`` (five U-Nets); ``lla_lastlayer`` (linearised Laplace on the 1x1-convolution head, a
linear layer per pixel, with the full posterior of its weights: laplace-torch cannot predict a
segmentation network, its issue #111, so the GLM predictive is computed here); ``knn`` (Sun et
al.'s k-th neighbour distance of the normalised head features); ``gapa`` (layer chosen on
validation), ``gapa_default`` (``GAPA(unet).fit(x)``, untouched) and ``gapa_prior`` (no
conditioning).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from gapa.core import GAPA
from gapa.gp.search import NeighbourIndex
from gapa.moments import Moments
from gapa.predictive.classification import (
    VarianceScaleFit,
    fit_temperature,
)

from . import bench
from .backbones import training_seconds
from .baselines import Fitted
from .baselines.dropout import DROPOUT_RATES, choose_dropout_rate, mc_dropout_average
from .baselines.ensemble import member_seeds
from .baselines.knn import normalised
from .baselines.scores import MemberAverage, check_ood_scores, fit_logit_predictive, last_pass
from .bench import write_records
from .classification_bench import fit_calibrated, gapa_fitted
from .data.scenes import IGNORE, SHIFTS, SceneData, load_scenes, shifted
from .metrics import classification_report, ood_report
from .plotting import segmentation_figures
from .provenance import run_info
from .segmenters import cached_segmenter, mean_iou, segment_logits
from .selection import Selection, select

#: GAPA's candidate layers, chosen on calibrated validation NLL: the last ReLU of the last
#: decoder block (the library's default) and of the block before it (half the resolution).
GAPA_LAYER_CANDIDATES = {"layers": [["dec1.5"], ["dec2.5"]]}
#: GAPA's fixed settings: exact nearest-neighbour search by faiss (float32, as the network),
#: several times faster than the library's default torch search on 131k pixel queries per
#: batch (a tie between equidistant neighbours may resolve the other way; gapa_default keeps
#: the library's default).
GAPA_FIXED = {"search": "faiss"}
#: MC dropout's passes (its rates, one U-Net each, are DROPOUT_RATES, chosen on validation NLL).
MC_SAMPLES = 16
ENSEMBLE_MEMBERS = 5
#: kNN: Sun et al.'s k, and how many training pixels are indexed (a seeded random subset).
KNN_K = 50
KNN_BANK = 50_000
#: Last-layer Laplace: training pixels whose GGN is summed (a seeded random subset, scaled to
#: the whole training set) and the prior precisions tried, relative to the GGN's mean eigenvalue.
LAPLACE_PIXELS = 200_000
LAPLACE_PRIOR_GRID = tuple(10.0 ** k for k in range(-4, 5))
#: Scenes per forward pass.
BATCH = 32
#: OOD scenes drawn in the figure of maps; pixels per histogram of the OOD figure.
FIGURE_SCENES = 4
FIGURE_PIXELS = 20_000
#: Test scenes the shift curves are measured on, and the strengths.
SHIFT_SCENES = 100
SHIFT_STRENGTHS = (1, 2, 3, 4, 5)


def _pixels(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` to ``(N * H * W, C)``."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def head_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-Net's logits ``(N, C, H, W)`` and the features its 1x1 head reads, in one pass."""
    seen = []
    hook = model.head.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = [(model(xb), seen.pop()) for xb in x.split(BATCH)]
    finally:
        hook.remove()
    return torch.cat([o for o, _ in out]), torch.cat([f for _, f in out])


# --------------------------------------------------------------------------- methods


def _softmax_fitted(logits: Callable[[torch.Tensor], torch.Tensor], info: dict | None = None,
                    **scores) -> Fitted:
    return Fitted(lambda x: torch.softmax(logits(x), 1), info=info or {}, ood_scores=scores)


def fit_map(model: nn.Module, data: SceneData, **_) -> Fitted:
    """The frozen U-Net's softmax per pixel."""
    return _softmax_fitted(lambda x: segment_logits(model, x))


def fit_temperature_scaling(model: nn.Module, data: SceneData, **_) -> Fitted:
    """One temperature for every pixel, fitted on the validation pixels' NLL."""
    fit = fit_temperature(_pixels(segment_logits(model, data.val.images)),
                          data.val.labels.reshape(-1))
    return _softmax_fitted(lambda x: segment_logits(model, x) / fit.temperature,
                           {"temperature": fit.temperature})


def _averaged(average: Callable[[torch.Tensor], MemberAverage], info: dict) -> Fitted:
    passes = last_pass(average)
    return Fitted(lambda x: passes(x).probs.movedim(-1, 1), info=info,
                  ood_scores={"mutual_information": lambda x: passes(x).mutual_information})


def fit_mc_dropout(model: nn.Module, data: SceneData, *, seed: int, progress: bool,
                   rates: Sequence[float] = DROPOUT_RATES, **_) -> Fitted:
    """The U-Net trained with channel dropout at each rate of ``rates`` (cached), averaged over
    :data:`MC_SAMPLES` seeded masks; the rate of lowest validation pixel NLL is kept. Its score
    is the mutual information; ``fit_s`` sums every candidate's training and validation pass."""

    def average(net: nn.Module, x: torch.Tensor) -> MemberAverage:
        return mc_dropout_average(net, x, samples=MC_SAMPLES, seed=seed, class_dim=1, batch=BATCH)

    choice = choose_dropout_rate(
        rates, lambda p: cached_segmenter(data, seed=seed, dropout=p, progress=progress),
        lambda net: _pixel_report(average(net, data.val.images).probs.movedim(-1, 1),
                                  data.val.labels)["nll"])
    fitted = _averaged(partial(average, choice.model),
                       {"p": choice.p, "samples": MC_SAMPLES, "trained_now": choice.trained_now,
                        "selection": choice.selection.record()})
    fitted.fit_s = choice.seconds
    return fitted


def fit_ensemble(model: nn.Module, data: SceneData, *, seed: int, progress: bool, **_) -> Fitted:
    """:data:`ENSEMBLE_MEMBERS` U-Nets (the seed's own and others, cached), their softmax
    averaged; the score is the mutual information. ``fit_s`` sums their training times."""
    members, seconds = [], 0.0
    for s in member_seeds(seed, ENSEMBLE_MEMBERS):
        net, path, _ = cached_segmenter(data, seed=s, progress=progress)
        members.append(net)
        seconds += training_seconds(path) or math.nan

    def average(x: torch.Tensor) -> MemberAverage:
        out = MemberAverage()
        for net in members:
            out.add(torch.softmax(segment_logits(net, x), 1).movedim(1, -1))
        return out

    fitted = _averaged(average, {"members": ENSEMBLE_MEMBERS})
    fitted.fit_s = seconds
    return fitted


def _with_bias(features: torch.Tensor) -> torch.Tensor:
    """``(n, d)`` head features with a 1 appended: the bias is the last weight."""
    return torch.cat([features, torch.ones_like(features[:, :1])], 1)


def last_layer_ggn(probs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The GGN of the softmax cross-entropy in the weights ``W (C x (d+1))`` of a linear head,
    summed over pixels: ``sum_n (diag(p_n) - p_n p_n^T) kron phi_n phi_n^T``, weights ordered
    class-major (float64; ``probs (n, C)``, ``features (n, d+1)``)."""
    p, f = probs.double(), features.double()
    n_classes, d = p.shape[1], f.shape[1]
    blocks = torch.einsum("nc,ni,nj->cij", p, f, f)  # the diag(p) part, one block per class
    ggn = torch.block_diag(*blocks)
    u = (p[:, :, None] * f[:, None, :]).reshape(len(p), n_classes * d)  # p kron phi
    return ggn - u.T @ u


def head_logit_variance(features: torch.Tensor, sigma: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``diag(J Sigma J^T)`` per pixel for the head's Jacobian ``J = I_C kron phi^T``: each
    class reads its own block of the weight posterior, ``var_c = phi^T Sigma_cc phi``
    (``features (n, d+1)``, ``sigma`` class-major; float64, ``(n, C)``)."""
    d = features.shape[1]
    blocks = torch.stack([sigma[c * d:(c + 1) * d, c * d:(c + 1) * d] for c in range(n_classes)])
    phi = features.double()
    return torch.einsum("ni,cij,nj->nc", phi, blocks, phi).clamp_min(0.0)


def fit_lla_lastlayer(model: nn.Module, data: SceneData, *, seed: int, **_) -> Fitted:
    """Linearised Laplace on the 1x1 head, whose weights act on each pixel's features as one
    linear layer: GLM logit mean (the network's own) and variance
    ``var_c = phi^T Sigma_cc phi`` with the full posterior ``Sigma = (GGN + delta I)^-1``. The
    GGN sums a seeded subset of :data:`LAPLACE_PIXELS` training pixels scaled to all of them;
    ``delta`` is chosen on validation NLL (after the variance scale) from
    :data:`LAPLACE_PRIOR_GRID` times the GGN's mean eigenvalue."""
    gen = torch.Generator().manual_seed(seed)
    logits, feats = head_features(model, data.train.images)
    n_pixels = logits.shape[0] * logits.shape[2] * logits.shape[3]
    pick = torch.randperm(n_pixels, generator=gen)[:LAPLACE_PIXELS]
    probs = torch.softmax(_pixels(logits)[pick].double(), -1)
    ggn = last_layer_ggn(probs, _with_bias(_pixels(feats)[pick])) * (n_pixels / len(pick))
    n_classes = logits.shape[1]
    scale = float(torch.diagonal(ggn).mean())
    eye = torch.eye(len(ggn), dtype=torch.float64)

    def moments_at(delta: float) -> Callable[[torch.Tensor], Moments]:
        sigma = torch.linalg.inv(ggn + delta * eye)

        def moments(x: torch.Tensor) -> Moments:
            out, f = head_features(model, x)
            var = head_logit_variance(_with_bias(_pixels(f)), sigma, n_classes)
            var = var.to(out.dtype).reshape(out.shape[0], *out.shape[2:], n_classes)
            return Moments(out, var.movedim(-1, 1))

        return moments

    def fit(setting: dict) -> tuple[float, Fitted]:
        fitted = fit_logit_predictive(
            moments_at(setting["prior"] * scale), data.val.images, data.val.labels, class_dim=1,
            info={"prior_precision": setting["prior"] * scale, "ggn_pixels": len(pick),
                  "train_pixels": n_pixels})
        return fitted.info["val_nll"], fitted

    fitted, selection = select({"prior": list(LAPLACE_PRIOR_GRID)}, fit)
    fitted.info["selection"] = selection.record()
    return fitted


def fit_knn(model: nn.Module, data: SceneData, *, seed: int, **_) -> Fitted:
    """The MAP softmax, and the distance of each pixel's normalised head features to its
    :data:`KNN_K`-th nearest among :data:`KNN_BANK` random training pixels (exact faiss)."""
    _, feats = head_features(model, data.train.images)
    bank = _pixels(feats)
    pick = torch.randperm(len(bank), generator=torch.Generator().manual_seed(seed))[:KNN_BANK]
    index = NeighbourIndex(normalised(bank[pick]), "faiss")

    @last_pass
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, f = head_features(model, x)
        return out, f

    def distance(x: torch.Tensor) -> torch.Tensor:
        out, f = forward(x)
        q = normalised(_pixels(f))
        kth = index.points[index.search(q, KNN_K)[:, -1]]
        return (q - kth).norm(dim=1).reshape(out.shape[0], *out.shape[2:])

    selection = Selection({"k": [KNN_K]}, [({"k": KNN_K}, None)], {"k": KNN_K},
                          "declared (k changes only the OOD score; no validation data judges it)")
    return Fitted(lambda x: torch.softmax(forward(x)[0], 1), ood_scores={"distance": distance},
                  info={"k": KNN_K, "n_index": len(pick), "selection": selection.record()})


#: How the segmentation GAPA predicts and calibrates: classes on axis 1, :data:`BATCH` scenes
#: per pass.
GAPA_PREDICT = {"class_dim": 1, "batch_size": BATCH}


def fit_gapa(model: nn.Module, data: SceneData, *, seed: int = 0, progress: bool = False,
             candidates=GAPA_LAYER_CANDIDATES, **fixed) -> Fitted:
    """GAPA at each candidate layer (with :data:`GAPA_FIXED` updated by ``fixed``), fitted on
    the training scenes and calibrated on the validation pixels; the lowest calibrated
    validation NLL is kept."""
    fixed = {**GAPA_FIXED, **fixed}

    def fit(setting: dict) -> tuple[float, tuple[GAPA, VarianceScaleFit]]:
        gm, cal = fit_calibrated(model, data.train.images, data.val.images, data.val.labels,
                                 seed=seed, progress=progress, predict=GAPA_PREDICT,
                                 **fixed, **setting)
        return cal.nll, (gm, cal)

    (gm, cal), selection = select(candidates, fit)
    return gapa_fitted(gm, cal, {"selection": selection.record()}, GAPA_PREDICT)


def fit_gapa_default(model: nn.Module, data: SceneData, *, seed: int = 0,
                     progress: bool = False, **_) -> Fitted:
    """``GAPA(unet).fit(x)`` and the calibration, nothing chosen."""
    return gapa_fitted(*fit_calibrated(model, data.train.images, data.val.images,
                                       data.val.labels, seed=seed, progress=progress,
                                       predict=GAPA_PREDICT), {}, GAPA_PREDICT)


METHODS: dict[str, Callable[..., Fitted]] = {
    "map": fit_map,
    "temperature": fit_temperature_scaling,
    "mc_dropout": fit_mc_dropout,
    "ensemble": fit_ensemble,
    "lla_lastlayer": fit_lla_lastlayer,
    "knn": fit_knn,
    "gapa": fit_gapa,
    "gapa_default": fit_gapa_default,
    "gapa_prior": partial(fit_gapa, conditioning="prior"),
}


# --------------------------------------------------------------------------- scoring


@dataclass
class SegResult:
    """One method on one seed: the pixel metrics, OOD per set and score, the shift curves."""

    method: str
    seed: int
    accuracy: float
    miou: float
    nll: float
    ece: float
    brier: float
    ood_scores: dict[str, dict[str, dict[str, float]]]
    shift: dict[str, dict[int, dict[str, float]]]
    fit_s: float
    test_s: float
    batch_s: float
    plain_batch_s: float
    own_score: str | None = None
    info: dict = field(default_factory=dict)
    dataset: str = ""
    run: dict | None = None
    #: What the figures need (not recorded): the own score's name and maps on the first
    #: :data:`FIGURE_SCENES` OOD scenes, the reliability curve, OOD score samples.
    figure: dict = field(default_factory=dict, repr=False)

    def record(self) -> dict:
        """JSON-ready; the classification report reads it (:mod:`gapa_bench.report`)."""
        return {"kind": "segmentation", "backbone": "unet", **{k: getattr(self, k) for k in (
            "dataset", "method", "seed", "accuracy", "miou", "nll", "ece", "brier",
            "ood_scores", "own_score", "shift", "fit_s", "test_s", "batch_s", "plain_batch_s",
            "info", "run")}}


def _pixel_report(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    keep = labels.reshape(-1) != IGNORE
    return classification_report(_pixels(probs)[keep], labels.reshape(-1)[keep])


def _best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_method(name: str, model: nn.Module, data: SceneData, *, seed: int,
               progress: bool = False) -> SegResult:
    """Fit, then score on the test, OOD and shifted scenes. ``test_s`` is one pass over the
    test scenes giving the probabilities and every score; ``batch_s`` the best of three of the
    method's own passes (probabilities and its epistemic score, not the entropy maps every
    method shares) over one batch of :data:`BATCH` scenes, ``plain_batch_s`` the U-Net's own
    forward on the same batch, timed in the same process."""
    t0 = time.perf_counter()
    fitted = METHODS[name](model, data, seed=seed, progress=progress)
    fit_s = time.perf_counter() - t0 if fitted.fit_s is None else fitted.fit_s
    own = check_ood_scores(fitted.ood_scores)

    def score(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        probs = fitted.predict(x)
        entropy = -torch.special.xlogy(probs, probs).sum(1)
        out = {"entropy": entropy, "max_prob": 1.0 - probs.amax(1)}
        out.update({k: f(x) for k, f in fitted.ood_scores.items()})
        return probs, out

    def predictive(x: torch.Tensor) -> None:  # the method's own pass, without the shared scores
        fitted.predict(x)
        for f in fitted.ood_scores.values():
            f(x)

    batch = data.test.images[:BATCH]
    predictive(batch[:2].clone())  # warm-up
    batch_s = _best_of(lambda: predictive(batch.clone()))
    plain_batch_s = _best_of(lambda: segment_logits(model, batch))
    t0 = time.perf_counter()
    probs, _ = score(data.test.images)
    test_s = time.perf_counter() - t0
    report = _pixel_report(probs, data.test.labels)
    report["miou"] = mean_iou(probs.argmax(1), data.test.labels, data.n_classes)
    ood, headline = {}, own or "entropy"
    figure = {"score_name": headline, "reliability": _reliability(probs, data.test.labels)}
    for i, (kind, scenes) in enumerate(data.ood.items()):
        _, maps = score(scenes.images)
        unknown, known = scenes.unknown, scenes.labels != IGNORE
        for s, m in maps.items():
            ood.setdefault(s, {})[kind] = ood_report(m[known], m[unknown])
        if i == 0:
            gen = torch.Generator().manual_seed(seed)
            figure["maps"] = maps[headline][:FIGURE_SCENES].numpy()
            figure["ood"] = tuple(_sample(maps[headline][mask], gen).numpy()
                                  for mask in (known, unknown))
    curves: dict[str, dict[int, dict[str, float]]] = {}
    base = data.test.images[:SHIFT_SCENES]
    for kind in SHIFTS:
        for strength in SHIFT_STRENGTHS:
            r = _pixel_report(fitted.predict(shifted(base, kind, strength, seed=seed)),
                              data.test.labels[:SHIFT_SCENES])
            curves.setdefault(kind, {})[strength] = {"nll": r["nll"], "ece": r["ece"],
                                                     "accuracy": r["accuracy"]}
    return SegResult(name, seed, report["accuracy"], report["miou"], report["nll"],
                     report["ece"], report["brier"], ood, curves, fit_s, test_s, batch_s,
                     plain_batch_s, own, fitted.info, data.describe(), figure=figure)


def _sample(values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    keep = torch.randperm(len(values), generator=gen)[:FIGURE_PIXELS]
    return values[keep].double()


def _reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15):
    """Mean confidence and pixel accuracy in ``bins`` equal-width confidence bins (used ones)."""
    keep = labels.reshape(-1) != IGNORE
    p = _pixels(probs)[keep].double()
    conf, correct = p.max(1)
    correct = (correct == labels.reshape(-1)[keep]).double()
    which = (conf * bins).long().clamp_max(bins - 1)
    used = [b for b in range(bins) if bool((which == b).any())]
    return ([float(conf[which == b].mean()) for b in used],
            [float(correct[which == b].mean()) for b in used])


def run_benchmark(methods: Sequence[str], seeds: int | Sequence[int] = 3, *,
                  progress: bool = True, json_path: str | os.PathLike | None = None,
                  figures: str | None = None, log=print, **scene_sizes) -> list[SegResult]:
    """Each method on each seed's U-Net (trained once, cached) and scenes of that seed
    (``seeds``: N for 0..N-1, or the seeds themselves, :func:`gapa_bench.bench.seed_list`);
    with ``figures``, seed 0's figures in that folder
    (:func:`gapa_bench.plotting.segmentation_figures`)."""
    seeds = bench.seed_list(seeds)
    run = run_info()
    results: list[SegResult] = []
    for seed in seeds:
        data = load_scenes(seed=seed, **scene_sizes)
        model, path, trained = cached_segmenter(data, seed=seed, progress=progress)
        if seed == 0:
            log(data.describe())
        log(f"U-Net of seed {seed}: {'trained now' if trained else 'cached'}, "
            f"{training_seconds(path):.0f} s of training")
        for name in methods:
            res = run_method(name, model, data, seed=seed, progress=progress)
            res.run = run
            results.append(res)
            log(f"seed {seed} {name}: mIoU {res.miou:.3f}, NLL {res.nll:.4f}, ECE {res.ece:.4f}; "
                f"fit {res.fit_s:.0f} s, batch x{res.batch_s / res.plain_batch_s:.2f}")
            if json_path is not None:
                write_records(json_path, results)
        if seed == 0 and figures and results:
            kind, scenes = next(iter(data.ood.items()))
            x = scenes.images[:FIGURE_SCENES]
            shown = {"images": x[:, 0].numpy(), "labels": scenes.labels[:FIGURE_SCENES].numpy(),
                     "unknown": scenes.unknown[:FIGURE_SCENES].numpy(),
                     "predicted": segment_logits(model, x).argmax(1).numpy()}
            first = {r.method: r for r in results if r.seed == 0}
            for path in segmentation_figures(Path(figures), first, shown,
                                             title=f"(seed 0, OOD: {kind})"):
                log(f"figure: {path}")
    return results


def parse_methods(spec: str | Sequence[str] | None) -> list[str]:
    """``None`` or ``"all"`` for every method, else a comma-separated list of known names."""
    return bench.parse_methods(spec, METHODS)


def load_records(*paths: str | os.PathLike) -> list[dict]:
    """The records of one or more ``--json`` files."""
    out = []
    for path in paths:
        with open(path) as f:
            out += json.load(f)
    return out
