"""Workflow arguments a user gets wrong, or gets right in a less common dtype: each is a typed
error raised before anything changes, or works end to end.

Batch sizes (fit, predict, classify, moments, calibrate_classifier), a training loader whose
batches switch between values and integer ids, targets that are not a tensor, ``layers`` that
are not names, per-call-site overrides for a call that never happens, an unusable
``map_location``, and K > 1 / exact conditioning of a half-precision network.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gapa

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(dtype: torch.dtype = torch.float32, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, classes)).to(dtype).eval()


def inputs(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture(scope="module")
def fitted():
    model = mlp()
    gm = gapa.GAPA(model, m=16).fit(inputs(60, 0))
    gm.calibrate(inputs(20, 1), torch.randn(20, 3), lengthscale_factors=None)
    gm.calibrate_classifier(inputs(20, 1), torch.arange(20) % 3, lengthscale_factors=None)
    return gm


def outputs(gm: gapa.GAPA, x: torch.Tensor) -> tuple:
    out = gm(x)
    return out.mean, out.var, gm.calibration, gm.class_calibration, gm.lengthscale_factor


def assert_same(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2:] == b[2:]


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_fit_refuses_a_bad_batch_size_and_keeps_its_state(fitted, size):
    x = inputs(5, 2)
    before = outputs(fitted, x)
    with pytest.raises(gapa.ConfigurationError, match="batch_size"):
        fitted.fit(inputs(30, 3), batch_size=size)
    assert_same(outputs(fitted, x), before)


@pytest.mark.parametrize("call", ["moments", "predict", "classify", "calibrate_classifier"])
@pytest.mark.parametrize("size", [0, -3])
def test_batched_calls_refuse_a_bad_batch_size(fitted, call, size):
    x = inputs(5, 2)
    before = outputs(fitted, x)
    args = (x, torch.arange(5) % 3) if call == "calibrate_classifier" else (x,)
    with pytest.raises(gapa.ConfigurationError, match="batch_size"):
        getattr(fitted, call)(*args, batch_size=size)
    assert_same(outputs(fitted, x), before)


def test_fit_refuses_a_batch_of_integers_after_floating_ones(fitted):
    # the first batch fixes the kind of the inputs, as at predict; the model's own dtype error
    # (torch's RuntimeError) is not what the user should see
    x = inputs(5, 2)
    before = outputs(fitted, x)
    with pytest.raises(gapa.InputError, match="integer ids"):
        fitted.fit([inputs(10, 3), (10 * inputs(10, 4)).long()])
    assert_same(outputs(fitted, x), before)


def test_calibrate_refuses_targets_that_are_not_a_tensor(fitted):
    x = inputs(5, 2)
    before = outputs(fitted, x)
    with pytest.raises(gapa.InputError, match=r"targets must be a torch\.Tensor"):
        fitted.calibrate(x, torch.randn(5, 3).tolist())
    assert_same(outputs(fitted, x), before)


@pytest.mark.parametrize("layers", [1, [1], ["1", None]])
def test_layers_that_are_not_names_are_a_layer_error(layers):
    with pytest.raises(gapa.LayerError, match="module name"):
        gapa.GAPA(mlp(), layers=layers)


def test_layers_may_be_any_iterable_of_names():
    model = mlp()
    gm = gapa.GAPA(model, layers=dict(model.named_modules()).keys() - {"", "0", "2"})
    assert gm.layers == ["1"]


@pytest.mark.parametrize("key", ["1#1", "1#0"])
def test_overrides_for_a_call_site_that_never_runs_are_refused_at_fit(fitted, key):
    # "1" runs once, so its only call site is "1": an override for "1#1" would do nothing
    gm = gapa.GAPA(mlp(), m=16, hyperparameters={key: {"lengthscale": 0.5}})
    with pytest.raises(gapa.LayerError, match="never reached"):
        gm.fit(inputs(60, 0))
    assert not gm.is_fitted


def test_overrides_for_a_second_call_site_apply():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.act(self.act(self.fc(x))))

    torch.manual_seed(0)
    model = Twice().eval()
    gm = gapa.GAPA(model, layers=["act"], m=16,
                   hyperparameters={"act#1": {"lengthscale": 0.5}}).fit(inputs(60, 0))
    assert bool((gm.sites["act#1"].hyperparameters.lengthscale == 0.5).all())
    assert not bool((gm.sites["act"].hyperparameters.lengthscale == 0.5).all())


@pytest.mark.parametrize("where", ["nonsense", "cuda:999"])
def test_load_with_an_unusable_map_location_is_a_configuration_error(fitted, tmp_path, where):
    path = fitted.save(tmp_path / "m.gapa")
    with pytest.raises(gapa.ConfigurationError, match="map_location"):
        gapa.GAPA.load(path, fitted.model, map_location=where)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [{"k": 4}, {"conditioning": "exact", "m": None},
                                     {"k": 4, "propagation": "jacobian"}])
def test_half_precision_conditions_on_several_rows(dtype, options, tmp_path):
    # torch has no half-precision Cholesky: the K x K (or exact) Gram matrices are factorised
    # in float32 and the variances given back in the model's dtype, close to a float32 fit's
    model = mlp(dtype)
    x = inputs(6, 2, dtype)
    gm = gapa.GAPA(model, **{"m": 16, **options}).fit(inputs(60, 0, dtype))
    out = gm(x)
    with torch.no_grad():
        assert torch.equal(out.mean, model(x))
    assert out.var.dtype == dtype and bool(torch.isfinite(out.var).all())
    reference = gapa.GAPA(mlp(), **{"m": 16, **options}).fit(inputs(60, 0))(x.float()).var
    assert torch.allclose(out.var.float(), reference, rtol=0.1, atol=1e-3)
    gm.calibrate(x, torch.randn(6, 3).to(dtype))
    loaded = gapa.GAPA.load(gm.save(tmp_path / "half.gapa"), model)
    assert torch.equal(loaded(x).var, gm(x).var)


class TwoLogits(nn.Module):
    """A one-logit (sigmoid) classifier as the softmax of [0, z]: what the refusal suggests."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        z = self.net(x)
        return torch.cat([torch.zeros_like(z), z], -1)


def test_a_one_logit_classifier_is_refused_with_the_two_logit_wrapper_that_works():
    model = mlp(classes=1)
    x, labels = inputs(20, 1), torch.arange(20) % 2
    gm = gapa.GAPA(model, m=16).fit(inputs(60, 0))
    before = outputs(gm, x)
    with pytest.raises(gapa.InputError, match=r"binary classifier with one logit"):
        gm.calibrate_classifier(x, labels)
    assert_same(outputs(gm, x), before)
    wrapped = TwoLogits(model).eval()
    gm = gapa.GAPA(wrapped, m=16).fit(inputs(60, 0))
    gm.calibrate_classifier(x, labels)
    pred = gm.classify(x)
    with torch.no_grad():
        assert torch.equal(pred.predicted, (model(x)[:, 0] > 0).long())
    assert torch.allclose(pred.probs.sum(-1), torch.ones(20))
