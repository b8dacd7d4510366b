"""The scores and the calibration every classification method shares
(gapa_bench.baselines.scores): entropy and max-prob by hand, mutual information zero for
identical members and positive otherwise, one pass per input tensor, and the variance scale of
every method with logit moments fitted on validation exactly as GAPA's is."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from gapa.core import GAPA
from gapa.errors import ConfigurationError
from gapa.moments import Moments
from gapa.predictive.classification import fit_variance_scale, predict_classes
from gapa_bench.baselines.scores import (
    LOGIT_METHOD,
    MemberAverage,
    check_ood_scores,
    entropy,
    fit_logit_predictive,
    last_pass,
    probability_scores,
)


def _probs(n: int, c: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, c, generator=gen, dtype=torch.float64), -1)


def test_probability_scores_by_hand():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    scores = probability_scores(probs)
    expected_entropy = torch.tensor([0.0, 1.5 * math.log(2), math.log(3)])
    torch.testing.assert_close(scores["entropy"], expected_entropy)
    torch.testing.assert_close(scores["max_prob"], torch.tensor([0.0, 0.5, 2 / 3]))
    assert set(scores) == {"entropy", "max_prob"}


def test_mutual_information_is_zero_for_identical_members():
    probs = _probs(50, 4, seed=0).float()
    average = MemberAverage()
    for _ in range(5):
        average.add(probs)
    assert average.count == 5 and average.probs.dtype == torch.float32
    torch.testing.assert_close(average.probs, probs, rtol=0, atol=1e-7)
    assert average.mutual_information.abs().max() <= 1e-6


def test_mutual_information_is_positive_for_different_members_and_matches_hand():
    members = [_probs(50, 4, seed=s) for s in range(3)]
    average = MemberAverage()
    for p in members:
        average.add(p)
    mean = torch.stack(members).mean(0)
    by_hand = entropy(mean) - torch.stack([entropy(p) for p in members]).mean(0)
    torch.testing.assert_close(average.probs, mean)
    torch.testing.assert_close(average.mutual_information, by_hand)
    assert (average.mutual_information > 0).all()


def test_member_average_needs_a_member():
    with pytest.raises(ConfigurationError, match="no members"):
        _ = MemberAverage().probs


def test_check_ood_scores_names_the_epistemic_score_and_refuses_others():
    assert check_ood_scores({}) is None
    assert check_ood_scores({"distance": abs}) == "distance"
    with pytest.raises(ConfigurationError, match="only the epistemic"):
        check_ood_scores({"entropy": abs})
    with pytest.raises(ConfigurationError, match="at most one"):
        check_ood_scores({"distance": abs, "logit_variance": abs})


def test_last_pass_computes_once_per_tensor():
    calls = []

    @last_pass
    def double(x):
        calls.append(x)
        return 2 * x

    x, y = torch.ones(3), torch.ones(3)
    assert torch.equal(double(x), 2 * x) and double(x) is double(x)
    double(y)  # an equal but other tensor is another input
    double(x)
    assert len(calls) == 3 and calls[0] is x and calls[1] is y


def test_logit_method_is_gapas_default():
    default = inspect.signature(GAPA.calibrate_classifier).parameters["method"].default
    assert default == LOGIT_METHOD


def _moments(x: torch.Tensor) -> Moments:
    """A fixed toy 'method': logits and variances as functions of the input rows."""
    mean = torch.stack([x[:, 0], -x[:, 0], x[:, 1]], -1) * 4
    return Moments(mean, x[:, 2:5].abs() * 3)


def _labels(x: torch.Tensor, right: float, gen: torch.Generator) -> torch.Tensor:
    """The toy logits' class for a fraction ``right`` of the rows, a random class otherwise."""
    keep = torch.rand(len(x), generator=gen) < right
    return torch.where(keep, _moments(x).mean.argmax(-1), torch.randint(3, (len(x),), generator=gen))


def test_logit_predictive_fits_the_scale_on_validation_only():
    gen = torch.Generator().manual_seed(0)
    x_val, x_test = torch.randn(400, 5, generator=gen), torch.randn(30, 5, generator=gen)
    y_val = _labels(x_val, 0.7, gen)
    info: dict = {"kept": 1}
    fitted = fit_logit_predictive(_moments, x_val, y_val, info=info)
    val = _moments(x_val)
    expected = fit_variance_scale(val.mean, val.var, y_val, method=LOGIT_METHOD)
    assert info["variance_scale"] == expected.scale > 0  # a scale that does something
    assert (info["val_nll"], info["val_nll_map"]) == (expected.nll, expected.map_nll)
    assert info["kept"] == 1 and info["scale_val_rows"] == 400
    assert info["predictive"] == LOGIT_METHOD.value
    out = predict_classes(_moments(x_test), LOGIT_METHOD, variance_scale=expected.scale)
    assert torch.equal(fitted.predict(x_test), out.probs)
    # the raw summed variance, before the scale
    assert torch.equal(fitted.ood_scores["logit_variance"](x_test), _moments(x_test).var.sum(-1))
    # other validation labels move the scale; nothing else can (no test data is passed)
    other = fit_logit_predictive(_moments, x_val, _labels(x_val, 0.9, gen), info={})
    assert 0 < other.info["variance_scale"] < info["variance_scale"]  # fewer errors, less variance


def test_logit_predictive_uses_given_validation_moments():
    gen = torch.Generator().manual_seed(1)
    x_val, y_val = torch.randn(100, 5, generator=gen), torch.randint(3, (100,), generator=gen)
    calls = []

    def moments(x):
        calls.append(len(x))
        return _moments(x)

    fitted = fit_logit_predictive(moments, x_val, y_val, info={},
                                  val_moments=_moments(x_val))
    assert calls == []
    x = x_val[:7]
    fitted.predict(x)
    fitted.ood_scores["logit_variance"](x)
    assert calls == [7]  # probabilities and score of one tensor: one pass
