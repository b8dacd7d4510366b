"""Deep ensembles (Lakshminarayanan et al., 2017): several copies of the backbone trained from
independent initialisations, whose disagreement is the epistemic uncertainty.

The strongest common peer and the most expensive one: ``members`` full training runs. Member 0
is the MAP backbone itself (same seed and settings, so it comes from the same cache file), the
others differ only in their seed. Each member is a plain MSE regressor, so the ensemble
contributes only the spread of the member means; the benchmark adds one homoscedastic noise to
every method alike.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from gapa.errors import ConfigurationError
from gapa.moments import Moments

from ..backbones import cached_regressor, training_seconds
from ..classifiers import ENSEMBLE_MEMBERS, cached_classifier, logits
from ..data import RegressionData
from . import Fitted
from .scores import MemberAverage, last_pass


def member_seeds(seed: int, members: int) -> list[int]:
    """``seed`` for member 0 (the MAP backbone), ``1000 * i + seed`` for member ``i >= 1``."""
    return [seed] + [1000 * i + seed for i in range(1, members)]


def fit_ensemble(
    backbone: nn.Module,
    data: RegressionData,
    *,
    seed: int,
    progress: bool,
    train: dict,
    members: int = 5,
) -> Fitted:
    """Train (or load from the cache) ``members`` backbones with the ``train`` settings.

    ``predict`` moment-matches the equal-weight mixture of the members' predictions with one
    Gaussian: its mean is the average of the member means, its ``var`` their population
    variance (divisor ``members``), i.e. the mixture's variance without the noise term.
    ``fit_s`` is the sum of the members' recorded training times; ``backbone`` only supplies
    the device.
    """
    if members < 2:
        raise ConfigurationError(f"an ensemble needs at least 2 members, got {members}.")
    seeds = member_seeds(seed, members)
    device = next(backbone.parameters()).device
    nets, seconds = [], 0.0
    for s in tqdm(seeds, desc="ensemble members", disable=not progress, leave=False):
        net, path, _ = cached_regressor(data, seed=s, progress=progress, **train)
        nets.append(net.to(device))
        seconds += training_seconds(path)

    def predict(x: torch.Tensor) -> Moments:
        with torch.no_grad():
            means = torch.stack([net(x) for net in nets])
        return Moments(means.mean(0), means.var(0, correction=0))

    return Fitted(predict, fit_s=seconds, info={"members": members, "member_seeds": seeds})


def fit_ensemble_classifier(
    backbone: nn.Module, data, *, seed: int, progress: bool, train: dict, members: int = ENSEMBLE_MEMBERS,
) -> Fitted:
    """Train (or load) ``members`` classifiers of ``train["arch"]``; member 0 is the MAP
    backbone's cache file. ``predict`` is the members' average softmax (the ensemble's own
    predictive, not a moment match) and ``ood_scores["mutual_information"]`` the members'
    disagreement (:class:`gapa_bench.baselines.scores.MemberAverage`), both from one pass of
    every member per input tensor; ``fit_s`` is the sum of their training times."""
    if members < 2:
        raise ConfigurationError(f"an ensemble needs at least 2 members, got {members}.")
    seeds = member_seeds(seed, members)
    nets, seconds = [], 0.0
    for s in tqdm(seeds, desc="ensemble members", disable=not progress, leave=False):
        net, path, _ = cached_classifier(data, seed=s, progress=progress, **train)
        nets.append(net)
        seconds += training_seconds(path)

    @last_pass
    def average(x: torch.Tensor) -> MemberAverage:
        out = MemberAverage()
        for net in nets:
            out.add(torch.softmax(logits(net, x), -1))
        return out

    return Fitted(lambda x: average(x).probs, fit_s=seconds,
                  ood_scores={"mutual_information": lambda x: average(x).mutual_information},
                  info={"members": members, "member_seeds": seeds})
