"""Peer methods the regression and classification benchmarks compare GAPA with.

Every method is a function with one signature::

    fit(backbone, data, *, seed, progress, train) -> Fitted

``backbone`` is the frozen MAP network (eval mode) trained on ``data`` with the keyword arguments
``train`` (passed to :func:`gapa_bench.backbones.cached_regressor`; methods that train their own
networks, such as MC dropout and ensembles, train them with the same settings). ``Fitted.predict``
maps standardised inputs to :class:`gapa.Moments` in standardised target units whose ``var`` is
the method's *epistemic* variance only: the benchmark then fits one scale and one homoscedastic
noise on validation for every method alike (:mod:`gapa.predictive.regression`), so that no method wins by
its noise model.

The classification methods take a frozen classifier and a :class:`gapa_bench.data.ImageData`;
``train`` holds :func:`gapa_bench.classifiers.cached_classifier`'s settings (``arch`` first), and
``Fitted.predict`` maps images to class probabilities ``(N, C)``. Every one is scored out of
distribution by the predictive entropy and ``1 - max prob`` of those probabilities (computed by
the benchmark, alike for all), and by its epistemic score when it has one, which
``Fitted.ood_scores`` names (:mod:`gapa_bench.baselines.scores`; higher = more likely out of
distribution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gapa.moments import Moments


@dataclass
class Fitted:
    """A fitted method: its predictive, and what the benchmark should record about it.

    ``fit_s`` is set by methods whose cost is training networks (read from the backbone cache,
    so a cached model still reports what training it took); post-hoc methods leave it ``None``
    and the benchmark times their ``fit`` call. ``info`` lands in the JSON record (chosen
    hyperparameters, sample counts, ...).
    """

    predict: Callable[[torch.Tensor], Moments | torch.Tensor]
    fit_s: float | None = None
    info: dict = field(default_factory=dict)
    handle: Any = field(default=None, repr=False)  # the fitted object itself, for figures
    #: Classification only: the method's epistemic OOD score by name, at most one of
    #: ``"logit_variance"``, ``"mutual_information"``, ``"distance"`` (higher = more OOD); the
    #: entropy and max-prob scores come from ``predict``'s probabilities.
    ood_scores: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)


#: The signature every method shares.
FitFn = Callable[..., Fitted]
