"""MC dropout (Gal & Ghahramani, 2016): the backbone's architecture trained with dropout, whose
predictive is the spread of many stochastic forward passes with dropout left on.

It is the cheapest peer that trains its own network: one training run, with the backbone's
settings plus a dropout rate, and ``samples`` forward passes per prediction. Its mean is the
Monte Carlo mean of those passes, not the deterministic (dropout-off) network's output, and the
network is a different one from the frozen MAP backbone that GAPA keeps bit for bit.

The passes draw their dropout masks from a ``torch.Generator`` seeded per call rather than from
the global random state, so ``predict`` is reproducible, leaves the caller's random state alone,
and never switches the model to train mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gapa.errors import ConfigurationError
from gapa.moments import Moments

from ..backbones import cached_regressor, training_seconds
from ..classifiers import cached_classifier
from ..data import RegressionData
from ..metrics import classification_report
from ..selection import Selection, select
from . import Fitted
from .scores import MemberAverage, last_pass

#: Rows (inputs x passes) in one forward pass: bounds memory at about 200 MB for width 200.
CHUNK_ROWS = 1 << 16

#: Dropout rates every benchmark tries (regression, classification, segmentation), one network
#: each; validation NLL picks one (:func:`gapa_bench.selection.select`). Each rate is another
#: network per seed (the classifier MLP: 20 s on one core; the ResNet: 200 s on the H200,
#: benchmarks/results/classifiers-train-h200.log) and another set of passes over validation.
DROPOUT_RATES = (0.05, 0.1, 0.2)


def fit_mc_dropout(
    backbone: nn.Module,
    data: RegressionData,
    *,
    seed: int,
    progress: bool,
    train: dict,
    p: float = 0.1,
    samples: int = 100,
) -> Fitted:
    """Train (or load from the cache) the backbone's MLP with dropout ``p`` after each hidden
    activation, then predict with ``samples`` stochastic passes.

    ``backbone`` is unused beyond its device: MC dropout needs its own network, trained with
    the same ``train`` settings and ``seed``. ``predict`` returns the passes' sample mean (the
    Monte Carlo mean, not the dropout-off network's output) and unbiased sample variance (the
    epistemic part), with masks seeded by ``seed``; ``fit_s`` is the recorded training time.
    """
    if not 0.0 < p < 1.0:
        raise ConfigurationError(f"MC dropout needs a dropout rate in (0, 1), got p={p!r}.")
    if samples < 2:
        raise ConfigurationError(f"MC dropout needs >= 2 samples for a variance, got {samples}.")
    model, path, trained = cached_regressor(data, seed=seed, dropout=p, progress=progress, **train)
    model = model.to(_device(backbone))

    def predict(x: torch.Tensor) -> Moments:
        draws = mc_dropout_samples(model, x, samples=samples, seed=seed)
        return Moments(draws.mean(0), draws.var(0, correction=1))

    return Fitted(
        predict,
        fit_s=training_seconds(path),
        info={"p": p, "samples": samples, "trained_now": trained},
    )


def mc_dropout_samples(
    model: nn.Sequential, x: torch.Tensor, *, samples: int, seed: int
) -> torch.Tensor:
    """``samples`` forward passes of ``x`` with fresh dropout masks: shape ``(samples, N, d)``.

    The passes are batched (``x`` repeated along the rows, at most :data:`CHUNK_ROWS` rows per
    forward) and the masks come from a generator seeded with ``seed``, in the order the chunks
    are run: the same ``x`` and ``seed`` always give the same draws.
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)
    with torch.no_grad():
        blocks = [_block_samples(model, xb, samples, gen) for xb in x.split(CHUNK_ROWS)]
    return torch.cat(blocks, dim=1)


def _block_samples(model: nn.Sequential, x: torch.Tensor, samples: int, gen: torch.Generator):
    """The passes for at most :data:`CHUNK_ROWS` inputs, as many passes per forward as fit."""
    per_forward = max(1, CHUNK_ROWS // len(x))
    draws = []
    for start in range(0, samples, per_forward):
        k = min(per_forward, samples - start)
        draws.append(_stochastic_forward(model, x.repeat(k, 1), gen).view(k, len(x), -1))
    return torch.cat(draws)


def _stochastic_forward(model: nn.Sequential, h: torch.Tensor, gen: torch.Generator):
    """``model(h)`` with every ``nn.Dropout`` applied as in train mode, masks drawn from ``gen``."""
    for layer in model:
        if isinstance(layer, nn.Dropout):
            keep = torch.empty_like(h).bernoulli_(1.0 - layer.p, generator=gen)
            h = h * keep / (1.0 - layer.p)
        else:
            h = layer(h)
    return h


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# --------------------------------------------------------------------------- classification

#: Rows per stochastic forward pass of a classifier.
_CLASSIFIER_BATCH = 2048

def fit_mc_dropout_classifier(
    backbone: nn.Module, data, *, seed: int, progress: bool, train: dict,
    rates: Sequence[float] = DROPOUT_RATES, samples: int = 20,
) -> Fitted:
    """Train (or load) the classifier of ``train["arch"]`` with each dropout rate of ``rates``
    (after each hidden tanh of the MLP, between the convolutions of each ResNet block), keep the
    one of lowest validation NLL, and predict the softmax averaged over ``samples`` passes with
    dropout on, masks seeded by ``seed``.

    20 passes: the test-time budget of the published image benchmarks' MC-dropout rows.
    ``ood_scores["mutual_information"]`` is the passes' mutual information, from the same
    passes as the probabilities. ``fit_s`` is the recorded training time of every candidate
    network plus the validation passes that chose among them; ``info["selection"]`` is the
    :class:`gapa_bench.selection.Selection` record.
    """
    if samples < 1:
        raise ConfigurationError(f"MC dropout needs >= 1 sample, got {samples}.")
    choice = choose_dropout_rate(
        rates, lambda p: cached_classifier(data, seed=seed, dropout=p, progress=progress, **train),
        lambda model: classification_report(mc_dropout_average(
            model, data.x_val, samples=samples, seed=seed).probs, data.y_val)["nll"])
    model = choice.model

    @last_pass
    def passes(x: torch.Tensor) -> MemberAverage:
        return mc_dropout_average(model, x, samples=samples, seed=seed)

    return Fitted(lambda x: passes(x).probs, fit_s=choice.seconds,
                  ood_scores={"mutual_information": lambda x: passes(x).mutual_information},
                  info={"p": choice.p, "samples": samples, "trained_now": choice.trained_now,
                        "selection": choice.selection.record()})


@dataclass
class RateChoice:
    """The network of the dropout rate chosen on validation, and what choosing it cost."""

    model: nn.Module
    p: float
    trained_now: bool
    seconds: float  #: every candidate's recorded training time and validation pass
    selection: Selection


def choose_dropout_rate(rates: Sequence[float], load: Callable[[float], tuple],
                        val_nll: Callable[[nn.Module], float]) -> RateChoice:
    """Load (or train) the network of each rate of ``rates`` and keep the one of lowest
    validation NLL. ``load(p)`` returns ``(network, cache path, trained now)`` as the cached
    trainers do; ``val_nll(network)`` scores it with dropout on."""
    for p in rates:
        if not 0.0 < p < 1.0:
            raise ConfigurationError(f"MC dropout needs a dropout rate in (0, 1), got p={p!r}.")
    seconds = 0.0

    def fit(setting: dict) -> tuple[float, tuple]:
        nonlocal seconds
        model, path, trained = load(setting["p"])
        t0 = time.perf_counter()
        nll = val_nll(model)
        seconds += training_seconds(path) + time.perf_counter() - t0
        return nll, (model, trained)

    (model, trained), selection = select({"p": list(rates)}, fit)
    return RateChoice(model, selection.chosen["p"], trained, seconds, selection)


def mc_dropout_average(model: nn.Module, x: torch.Tensor, *, samples: int, seed: int,
                       class_dim: int = -1, batch: int = _CLASSIFIER_BATCH) -> MemberAverage:
    """The ``samples`` passes of any ``model`` with its dropout modules (``nn.Dropout``,
    ``nn.Dropout2d``, ...) in train mode (everything else, batch norm included, stays in eval
    mode), as a :class:`MemberAverage` (mean softmax and mutual information), ``batch`` inputs
    per forward. The softmax is over ``class_dim`` (1 for a segmentation network's
    ``(N, C, H, W)``), moved last for the average. The masks come from the global generator
    seeded with ``seed`` inside ``torch.random.fork_rng``, so the caller's random state is left
    as it was and the same ``x`` and ``seed`` give the same result."""
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not dropouts:
        raise ConfigurationError(
            f"{type(model).__name__} has no nn.Dropout (or Dropout2d, ...) module to sample")
    average = MemberAverage()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in dropouts:
            m.train()
        try:
            for _ in range(samples):
                probs = torch.cat([torch.softmax(model(xb), class_dim) for xb in x.split(batch)])
                average.add(probs.movedim(class_dim, -1))
        finally:
            for m in dropouts:
                m.eval()
    return average


def mc_dropout_probs(model: nn.Module, x: torch.Tensor, *, samples: int, seed: int) -> torch.Tensor:
    """Mean softmax of :func:`mc_dropout_average`'s passes."""
    return mc_dropout_average(model, x, samples=samples, seed=seed).probs
