"""The mean path is the frozen network's own computation: torch.equal, never a tolerance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gapa
from helpers import SharedActivation, mlp

ACTIVATIONS = [nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.Softplus]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_mean_equals_model_every_activation(act, dtype, train_x, gen):
    net = mlp([3, 16, 16, 2], act).to(dtype)
    x = torch.randn(37, 3, generator=gen, dtype=dtype) * 2
    gm = gapa.GAPA(net, ["1", "3"], k=4, m=None).fit(train_x.to(dtype), progress=False)
    out = gm(x)
    assert torch.equal(out.mean, net(x))
    assert out.var.shape == out.mean.shape and out.var.dtype == dtype
    assert bool((out.var > 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("widths", "layers"),
    [([3, 8, 1], None), ([3, 32, 32, 32, 1], ["1"]), ([3, 32, 32, 32, 1], ["3", "5"]),
     ([3, 64, 5], ["1"])],
)
def test_mean_equals_model_shapes_and_layers(widths, layers, dtype, train_x, gen):
    net = mlp(widths).to(dtype)
    x = torch.randn(50, 3, generator=gen, dtype=dtype)
    for conditioning, m, k in [("local", None, 8), ("local", 32, 4), ("exact", None, 1)]:
        gm = gapa.GAPA(net, layers, k=k, m=m, conditioning=conditioning)
        gm.fit(train_x.to(dtype), progress=False)
        assert torch.equal(gm(x).mean, net(x))


def test_default_layer_is_last_activation():
    net = mlp([3, 8, 8, 1])
    assert gapa.GAPA(net).layers == ["3"]


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
def test_inplace_activation_keeps_mean_and_variance(train_x, gen, propagation):
    """The GP variance is taken at the pre-activation, which an in-place activation overwrites
    (the Jacobian pass once read it after the write: the variance at relu(z), not z)."""
    net = mlp([3, 16, 16, 1], nn.ReLU)
    inplace = mlp([3, 16, 16, 1], lambda: nn.ReLU(inplace=True))
    x = torch.randn(20, 3, generator=gen)
    a = gapa.GAPA(net, ["1", "3"], k=4, m=None, propagation=propagation).fit(
        train_x, progress=False)(x)
    b = gapa.GAPA(inplace, ["1", "3"], k=4, m=None, propagation=propagation).fit(
        train_x, progress=False)(x)
    assert torch.equal(b.mean, inplace(x))
    assert torch.equal(a.mean, b.mean)
    torch.testing.assert_close(a.var, b.var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_reused_at_two_call_sites(dtype, train_x, gen):
    net = SharedActivation().to(dtype).eval()
    gm = gapa.GAPA(net, ["act"], k=4, m=None).fit(train_x.to(dtype), progress=False)
    assert set(gm.sites) == {"act", "act#1"}
    assert gm.sites["act"].cache_size == gm.sites["act#1"].cache_size == 300
    # each call site caches its own pre-activations
    assert not torch.equal(gm.sites["act"].rows, gm.sites["act#1"].rows)
    x = torch.randn(10, 3, generator=gen, dtype=dtype)
    out = gm(x)
    assert torch.equal(out.mean, net(x))
    only_second = gapa.GAPA(net, ["act"], k=4, m=None)
    only_second.fit(train_x.to(dtype), progress=False)
    assert bool((out.var > 0).all())


def test_fit_accepts_tensor_dataset_and_loader(train_x, gen):
    net = mlp([3, 16, 1])
    ds = torch.utils.data.TensorDataset(train_x, torch.zeros(len(train_x), 1))
    x = torch.randn(5, 3, generator=gen)
    results = []
    for data in (train_x, ds, torch.utils.data.DataLoader(ds, batch_size=64),
                 torch.utils.data.DataLoader(train_x, batch_size=50)):
        gm = gapa.GAPA(net, k=4, m=None).fit(data, progress=False)
        assert gm.sites["1"].cache_size == 300
        results.append(gm(x).var)
    for v in results[1:]:
        assert torch.equal(v, results[0])


def test_refit_replaces_the_input_contract(gen):
    """Inputs are checked against the latest fit: a refit on sequences of another length
    accepts that length (rows of every position are cached)."""
    net = mlp([3, 16, 1])
    gm = gapa.GAPA(net, k=2, m=None).fit(torch.randn(50, 4, 3, generator=gen), progress=False)
    assert gm.sites["1"].cache_size == 200
    gm.fit(torch.randn(50, 6, 3, generator=gen), progress=False)
    x = torch.randn(4, 6, 3, generator=gen)
    out = gm(x)
    assert torch.equal(out.mean, net(x)) and out.var.shape == (4, 6, 1)
    with pytest.raises(gapa.InputError, match=r"\(batch, 6, 3\)"):
        gm(torch.randn(4, 4, 3, generator=gen))


class _Tail(nn.Module):
    """Counts its calls: the part of the network after the GAPA layer."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, h):
        self.calls += 1
        return h.sum(-1, keepdim=True)


def test_fit_stops_each_batch_after_the_last_gapa_layer():
    """Only the first batch runs whole (it shows which call sites there are); the cache is the
    one a whole pass per batch gives, row for row."""
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), _Tail()).eval()
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    gm = gapa.GAPA(model, ["1", "3"], m=None).fit(x, batch_size=10)
    assert model[4].calls == 1
    whole = gapa.GAPA(model, ["1", "3"], m=None).fit(x, batch_size=50)
    for key in ("1", "3"):
        assert torch.equal(gm.sites[key].rows, whole.sites[key].rows)


class _Guarded(nn.Module):
    """Catches any exception of its body, as some user code does: runs the body again
    (``retry``), or raises it again as a RuntimeError."""

    def __init__(self, body, retry: bool):
        super().__init__()
        self.body, self.retry = body, retry

    def forward(self, x):
        try:
            return self.body(x)
        except Exception as e:
            if self.retry:
                return self.body(x)
            raise RuntimeError("the body failed") from e


def _guarded_fit(retry: bool, seed: int):
    body = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    model = _Guarded(body, retry).eval()
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(seed))
    return model, x, gapa.GAPA(model, ["body.1"], m=None).fit(x, batch_size=10)


def test_a_model_that_catches_the_stop_caches_each_row_once():
    model, x, gm = _guarded_fit(retry=True, seed=1)
    assert gm.sites["body.1"].cache_size == 40
    with torch.no_grad():
        assert torch.equal(gm(x[:5]).mean, model(x[:5]))


def test_a_model_that_rewraps_the_stop_still_fits():
    model, x, gm = _guarded_fit(retry=False, seed=2)
    assert gm.sites["body.1"].cache_size == 40
    assert gm.layer_scores(x[:3])["body.1"].shape == (3,)
    with pytest.raises(RuntimeError, match="the body failed"):  # a real error still surfaces
        model(torch.randn(2, 4))
