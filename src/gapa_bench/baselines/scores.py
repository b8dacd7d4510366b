"""What the classification methods share, so that the benchmark scores every one of them alike.

Three things:

- the OOD scores (:data:`SCORE_NAMES`, higher = more likely out of distribution). Every method is
  scored by the predictive entropy and by ``1 - max prob`` of its probabilities
  (:func:`probability_scores`, applied centrally by the benchmark), and by its epistemic score
  when it has one (:data:`EPISTEMIC_SCORES`): the summed logit variance of the methods with logit
  moments, the mutual information of those that average members (:class:`MemberAverage`), the
  k-th neighbour distance of kNN. Comparing methods on one score (entropy) separates what their
  probabilities know from what their own score adds;
- one pass per input batch (:func:`last_pass`): a costly method computes its probabilities and
  its epistemic score together, and the benchmark asks for both of the same tensor;
- one calibration for every method with logit moments (:func:`fit_logit_predictive`): the
  variance scale fitted on validation NLL with
  :func:`gapa.predictive.classification.fit_variance_scale` and the predictive
  :data:`LOGIT_METHOD`, exactly what :meth:`gapa.GAPA.calibrate_classifier` does for GAPA by
  default, so that no method wins by how its variance was scaled or turned into probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from gapa.errors import ConfigurationError
from gapa.moments import Moments
from gapa.predictive.classification import (
    ClassPrediction,
    Method,
    VarianceScaleFit,
    classes_last,
    fit_variance_scale,
    predict_classes,
)

from . import Fitted

T = TypeVar("T")

#: Scores every method has, read off its class probabilities.
PROBABILITY_SCORES = ("entropy", "max_prob")
#: Epistemic scores; a method has at most one (``Fitted.ood_scores``).
EPISTEMIC_SCORES = ("logit_variance", "mutual_information", "distance")
#: Every score name a record may carry, in table order.
SCORE_NAMES = PROBABILITY_SCORES + EPISTEMIC_SCORES

#: The predictive of every method with logit moments, and the one its variance scale is fitted
#: for: :meth:`gapa.GAPA.calibrate_classifier`'s default (one probit factor per input, so the
#: predicted class stays the network's own).
LOGIT_METHOD = Method.ARGMAX_PRESERVING


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy ``-Σ_c p_c log p_c`` in nats, per input (``0 log 0 = 0``)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def probability_scores(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"entropy", "max_prob"}`` of class probabilities ``(N, C)``: the scores every method
    has, so the same-score comparison needs nothing from the method but its probabilities."""
    return {"entropy": entropy(probs), "max_prob": 1.0 - probs.amax(-1)}


def check_ood_scores(scores: dict[str, Any]) -> str | None:
    """The name of the method's epistemic score (``None`` without one).

    Raises
    ------
    ConfigurationError
        A name outside :data:`EPISTEMIC_SCORES` (the probability scores are the benchmark's to
        compute, from the method's probabilities, so that they are computed alike), or more
        than one epistemic score (a record names one ``own_score``).
    """
    unknown = sorted(set(scores) - set(EPISTEMIC_SCORES))
    if unknown:
        raise ConfigurationError(
            f"Fitted.ood_scores may hold only the epistemic scores {EPISTEMIC_SCORES}; got "
            f"{unknown} (entropy and max_prob are computed from the probabilities by the "
            "benchmark)")
    if len(scores) > 1:
        raise ConfigurationError(f"a method has at most one epistemic score, got {sorted(scores)}")
    return next(iter(scores), None)


class MemberAverage:
    """The average softmax of equally weighted members (ensemble networks, dropout masks) and
    their mutual information, from running sums: no member's probabilities are kept.

    The mutual information ``H(mean_s p_s) - mean_s H(p_s)`` is the members' disagreement, the
    epistemic part of the predictive entropy (the rest, the members' mean entropy, is what each
    member already finds ambiguous). Sums are kept in float64 so that identical members give 0
    to rounding; the result is clamped at 0, which it is mathematically (Jensen).
    """

    def __init__(self) -> None:
        self.count = 0
        self._probs: torch.Tensor | None = None
        self._entropy: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None

    def add(self, probs: torch.Tensor) -> None:
        """Add one member's class probabilities ``(N, C)``."""
        p = probs.double()
        if self._probs is None:
            self._probs, self._entropy, self._dtype = p.clone(), entropy(p), probs.dtype
        else:
            self._probs += p
            self._entropy += entropy(p)
        self.count += 1

    def _check(self) -> None:
        if self.count == 0:
            raise ConfigurationError("MemberAverage has no members: add() at least one")

    @property
    def probs(self) -> torch.Tensor:
        """The members' mean probabilities, in the members' dtype."""
        self._check()
        return (self._probs / self.count).to(self._dtype)

    @property
    def mutual_information(self) -> torch.Tensor:
        """``H(mean p) - mean H(p)`` per input, ``>= 0``, in the members' dtype."""
        self._check()
        mean = self._probs / self.count
        return (entropy(mean) - self._entropy / self.count).clamp_min(0.0).to(self._dtype)


def last_pass(fn: Callable[[torch.Tensor], T]) -> Callable[[torch.Tensor], T]:
    """``fn`` that remembers its result for the last input tensor (by identity), so that a
    method's probabilities and epistemic score of one batch come from one pass.

    The tensor itself is held, so its identity cannot be reused by another; a tensor modified
    in place after the call would get the stale result (the benchmark never does that).
    """
    memo: dict[str, Any] = {}

    def call(x: torch.Tensor) -> T:
        if memo.get("x") is not x:
            memo.clear()  # free the previous result before computing the next
            out = fn(x)
            memo.update(x=x, out=out)
        return memo["out"]

    return call


def fit_logit_predictive(
    logit_moments: Callable[[torch.Tensor], Moments],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    info: dict,
    handle: Any = None,
    val_moments: Moments | None = None,
    class_dim: int = -1,
) -> Fitted:
    """The benchmark's classifier from a method's logit moments: the variance scale fitted on
    the validation NLL (:func:`~gapa.predictive.classification.fit_variance_scale` with
    :data:`LOGIT_METHOD`), then :func:`~gapa.predictive.classification.predict_classes` at that
    scale; its epistemic score is the summed raw logit variance (before the scale, as GAPA's:
    a positive scale changes no ranking, and a fitted scale of 0 must not erase the score).

    Parameters
    ----------
    logit_moments : callable
        Inputs ``(N, ...)`` to logit moments, ``mean`` and ``var`` ``(N, C)``.
    x_val, y_val : torch.Tensor
        The validation split the scale is fitted on (labels on the logits' device).
    info : dict
        The method's record, updated in place with ``variance_scale``, ``val_nll`` (at the
        scale), ``val_nll_map`` (plain softmax), ``predictive`` and ``scale_val_rows``.
    handle : object, optional
        ``Fitted.handle``.
    val_moments : Moments, optional
        The moments of ``x_val`` when the method already has them (saves a pass).
    class_dim : int, default -1
        The logits' class axis: 1 for a segmentation network's ``(N, C, H, W)``, whose labels
        are ``(N, H, W)`` maps (every pixel is scored, and the scores are maps).

    Returns
    -------
    Fitted
        ``predict`` gives the probabilities and ``ood_scores["logit_variance"]`` the score, of
        one pass per input tensor.
    """
    val = logit_moments(x_val) if val_moments is None else val_moments
    last = classes_last(val, class_dim)
    fit: VarianceScaleFit = fit_variance_scale(last.mean, last.var, y_val.to(val.mean.device),
                                               method=LOGIT_METHOD)

    @last_pass
    def classify(x: torch.Tensor) -> ClassPrediction:
        return predict_classes(logit_moments(x), LOGIT_METHOD, variance_scale=fit.scale,
                               class_dim=class_dim)

    info.update(variance_scale=fit.scale, val_nll=fit.nll, val_nll_map=fit.map_nll,
                predictive=LOGIT_METHOD.value, scale_val_rows=len(y_val))
    return Fitted(lambda x: classify(x).probs, info=info, handle=handle,
                  ood_scores={"logit_variance": lambda x: classify(x).total_logit_variance})
