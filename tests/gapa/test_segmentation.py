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


def test_images_of_another_size_are_classified_per_pixel():
    """A fully convolutional network fitted on 8x8 crops classifies a 32 x 1 x 24 x 24 batch
    of 11 classes (per-pixel queries do not depend on the image size): per-pixel shapes, the
    network's labels, each pixel's moments those of the same pixel in a crop it sees alike.
    The rank and the channels stay the fit's; with per-input queries the size does too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 1), nn.Tanh(), nn.Conv2d(6, 11, 1)).double().eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64)
    x_val = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        labels = net(x_val).argmax(1)
    gm = gapa.GAPA(net, ["1"]).fit(x)
    gm.calibrate_classifier(x_val, labels, class_dim=1, lengthscale_factors=None)
    big = torch.randn(32, 1, 24, 24, generator=gen, dtype=torch.float64)
    pred = gm.classify(big, class_dim=1)
    with torch.no_grad():
        assert torch.equal(pred.predicted, net(big).argmax(1))
    assert pred.probs.shape == (32, 11, 24, 24) and pred.predictive_entropy.shape == (32, 24, 24)
    crop = gm(big[:, :, 8:16, 8:16].contiguous())  # 1x1 convolutions: a pixel sees itself only
    torch.testing.assert_close(gm(big).var[:, :, 8:16, 8:16], crop.var, rtol=1e-12, atol=0)
    with pytest.raises(gapa.InputError, match=r"channels \(axis 1, 1\)"):
        gm(torch.randn(2, 3, 24, 24, dtype=torch.float64))
    with pytest.raises(gapa.InputError, match="rank"):
        gm(torch.randn(2, 1, 1, 24, 24, dtype=torch.float64))
    whole = gapa.GAPA(net, ["1"], queries="per_input").fit(x)
    with pytest.raises(gapa.InputError, match=r"do not match the training inputs"):
        whole(big)
