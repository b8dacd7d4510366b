"""The CNN architectures under propagation and GAPA (random weights, eval mode, float64).

Every operation of both networks has a rule, so the whole forward pass propagates: the mean is
the network's output bit for bit, and a GAPA layer on an inner ReLU gives a finite,
non-negative, non-zero variance at the output.

Against Monte Carlo the whole-network variance is *not* expected to agree exactly: the diagonal
rule drops the correlations that every mixing layer (a 3x3 convolution over 16-64 channels)
creates between units, and treats the two branches of a residual addition and the joined
halves of a skip connection as independent, though they share the same input noise. The dropped
covariances have either sign, so their net effect on each output is a bounded factor, not a
bias to zero or infinity. The test records the median ratio closed form / Monte Carlo and
asserts only the loose band [0.2, 5] (with 400 draws the Monte-Carlo variance itself has a
relative standard error of 7%), which catches a lost factor (a missing square, a dropped
variance term, an unsupported op falling back to zero) without claiming more than the
approximation gives.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gapa
from gapa.errors import InputError
from gapa.propagation import propagate
from gapa.reference import monte_carlo_propagate
from gapa_bench.architectures import SmallResNet, UNet

DT = torch.float64
SIZE = 16  # both networks are convolutional; a 16x16 input keeps the tests fast
MC_SAMPLES = 400


def _calibrated(model: nn.Module, seed: int) -> nn.Module:
    """Random weights with batch-norm statistics and affine parameters that are not the
    identity: the running statistics are averaged over a random batch, as training would."""
    torch.manual_seed(seed)
    model = model.double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, SIZE, SIZE, dtype=DT))
    return model.eval()


MODELS = {
    "SmallResNet": (lambda: SmallResNet(), "stages.2.1.relu1"),
    "UNet": (lambda: UNet(num_classes=3), "bottleneck.2"),
}


@pytest.fixture(params=list(MODELS), scope="module")
def case(request):
    make, layer = MODELS[request.param]
    return request.param, _calibrated(make(), seed=0), layer


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_propagate_keeps_the_mean(case):
    _, model, _ = case
    x = _inputs(2, 1)
    out = propagate(model, x, torch.full_like(x, 1e-4))
    assert torch.equal(out.mean, model(x))
    assert bool(torch.isfinite(out.var).all()) and bool((out.var > 0).all())


def test_gapa_on_an_inner_relu(case):
    _, model, layer = case
    gm = gapa.GAPA(model, [layer], k=1, m=32).fit(_inputs(8, 2), progress=False)
    x = _inputs(3, 3)
    out = gm(x)
    assert torch.equal(out.mean, model(x))
    assert out.var.shape == out.mean.shape
    assert bool(torch.isfinite(out.var).all()) and bool((out.var >= 0).all())
    assert bool((out.var > 0).any())


def test_whole_network_variance_against_monte_carlo(case, record_property):
    name, model, _ = case
    x = _inputs(2, 4)
    var = torch.full_like(x, 1e-6)  # small: first order is accurate through the ReLUs
    closed = propagate(model, x, var)
    gen = torch.Generator().manual_seed(5)
    mc = monte_carlo_propagate(model, x, var, MC_SAMPLES, generator=gen, chunk=MC_SAMPLES // 2)
    ratio = (closed.var / mc.var).median().item()
    record_property(f"{name}_median_variance_ratio", ratio)
    assert 0.2 < ratio < 5, f"{name}: median closed-form / Monte-Carlo variance ratio {ratio:.3f}"


def test_unet_refuses_sizes_it_cannot_halve_twice():
    with pytest.raises(InputError, match="divisible by 4"):
        UNet()(torch.randn(1, 1, 14, 14))


def test_whole_inputs_as_queries(case):
    """``queries="per_input"``: one query per image over all C x H x W values of the layer; the
    variance is the site's own, reshaped, and a training image is certain where a shifted one
    is not."""
    _, model, layer = case
    train = _inputs(16, 6)
    gm = gapa.GAPA(model, [layer], k=1, m=None, queries="per_input").fit(train, progress=False)
    per_position = gapa.GAPA(model, [layer], k=1, m=None).fit(train, progress=False)
    rows = gm.pre_activations(train[:2])[layer]
    seen = []
    handle = model.get_submodule(layer).register_forward_pre_hook(lambda _, a: seen.append(a[0]))
    with torch.no_grad():
        model(train[:2])
    handle.remove()
    z = seen[0]  # (2, C, H, W)
    assert torch.equal(rows, z.flatten(1))  # one row of C x H x W values per image
    assert gm.sites[layer].cache_size == 16
    assert per_position.sites[layer].cache_size == 16 * z[0, 0].numel()
    site_var = gm.sites[layer].variance(z.flatten(1)).reshape(z.shape)
    assert torch.equal(gm.site_variance(layer, z), site_var)
    near, far = gm(train[:3]), gm(train[:3] + 3.0)
    assert torch.equal(near.mean, model(train[:3]))
    assert bool((far.var.sum(-1) > near.var.sum(-1)).all())


def test_unknown_query_mode_raises():
    with pytest.raises(gapa.ConfigurationError, match="unknown queries"):
        gapa.GAPA(SmallResNet(), queries="pixels")
