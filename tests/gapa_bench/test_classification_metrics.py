"""Classification and OOD metrics against scikit-learn and hand computations."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from gapa.errors import InputError, NonFiniteError
from gapa_bench.metrics import ECE_BINS, classification_report, ood_report


def _probs(n: int = 500, c: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2.0 * torch.randn(n, c, generator=gen, dtype=torch.float64), -1)
    labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # calibrated by construction
    return probs, labels


def test_report_matches_hand_computation():
    probs, labels = _probs()
    rep = classification_report(probs, labels)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    ece = 0.0
    for b in range(ECE_BINS):
        lo, hi = b / ECE_BINS, (b + 1) / ECE_BINS
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.double().mean() * (conf[inside].mean() - correct[inside].mean()).abs()
    one_hot = torch.nn.functional.one_hot(labels, 4).double()
    assert rep["accuracy"] == pytest.approx(float(correct.mean()), abs=1e-12)
    assert rep["nll"] == pytest.approx(float(-probs[torch.arange(500), labels].log().mean()), rel=1e-12)
    assert rep["brier"] == pytest.approx(float((probs - one_hot).square().sum(1).mean()), rel=1e-12)
    assert rep["ece"] == pytest.approx(float(ece), abs=1e-6)


def test_ece_of_overconfident_predictions_exceeds_calibrated_ones():
    probs, labels = _probs(4000)
    sharp = torch.softmax(3.0 * probs.log(), -1)
    assert classification_report(sharp, labels)["ece"] > 3 * classification_report(probs, labels)["ece"]


def test_ood_report_matches_scikit_learn():
    gen = torch.Generator().manual_seed(1)
    s_in, s_out = torch.randn(300, generator=gen), torch.randn(200, generator=gen) + 1.0
    rep = ood_report(s_in, s_out)
    y = [0] * 300 + [1] * 200
    scores = torch.cat([s_in, s_out]).numpy()
    fpr, tpr, _ = roc_curve(y, scores)
    assert rep["auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-6)
    assert rep["fpr95"] == pytest.approx(fpr[tpr >= 0.95].min(), abs=1e-6)


def test_ood_report_extremes():
    perfect = ood_report(torch.zeros(10), torch.ones(10))
    assert perfect == {"auroc": 1.0, "fpr95": 0.0}
    assert ood_report(torch.ones(10), torch.zeros(10))["fpr95"] == 1.0


@pytest.mark.parametrize("bad", [
    lambda p, y: (p[:, :-1], y),  # rows no longer sum to 1
    lambda p, y: (p, y.int()),  # wrong label dtype
    lambda p, y: (p, y[:-1]),  # wrong label count
    lambda p, y: (p, y + 10),  # label out of range
    lambda p, y: (p.masked_fill(p > 0.9, float("nan")), y),  # NaN
])
def test_bad_inputs_raise(bad):
    probs, labels = _probs(50)
    probs[0] = torch.tensor([0.95, 0.05, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises((InputError, NonFiniteError), match=r"probs|labels"):
        classification_report(*bad(probs, labels))


def test_ood_scores_must_be_vectors():
    with pytest.raises(InputError, match="1-D"):
        ood_report(torch.zeros(4, 2), torch.zeros(4))
