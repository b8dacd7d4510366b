"""Dense classification: per-pixel predictives of a segmentation network (class axis 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gapa
from gapa.moments import Moments
from gapa.predictive.classification import fit_variance_scale

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_segmentation_network_is_calibrated_and_classified_per_pixel():
    """(N, C, H, W) logits: the scale is fitted on every pixel with ``class_dim=1``, and
    ``classify`` gives per-pixel maps whose predicted labels are the network's own."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1),
                        nn.Tanh(), nn.Conv2d(6, 3, 1)).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 1, 8, 8, generator=gen, dtype=torch.float64)
    x_val = torch.randn(8, 1, 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        labels = net(x_val).argmax(1)
    flip = torch.rand(labels.shape, generator=gen) < 0.3  # some pixels wrong
    labels = torch.where(flip, (labels + 1) % 3, labels)
    gm = gapa.GAPA(net, ["3"]).fit(x)
    fit = gm.calibrate_classifier(x_val, labels, class_dim=1, lengthscale_factors=None)
    out = gm(x_val)
    flat = Moments(out.mean.movedim(1, -1).reshape(-1, 3), out.var.movedim(1, -1).reshape(-1, 3))
    assert fit == fit_variance_scale(flat.mean, flat.var, labels.reshape(-1))
    x_test = 3 * torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    pred = gm.classify(x_test, class_dim=1, ood_score="total_variance")
    with torch.no_grad():
        assert torch.equal(pred.predicted, net(x_test).argmax(1))
    assert pred.probs.shape == (4, 3, 8, 8) and pred.ood_score.shape == (4, 8, 8)
    assert torch.equal(pred.ood_score, gm(x_test).var.sum(1))
