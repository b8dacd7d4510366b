"""Models that return their prediction in a container: a dict with a ``logits`` key is read
like a ``transformers`` output (both propagations and the Monte-Carlo reference); a dict
without one is refused with a typed error that says what is accepted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gapa
from gapa.reference import monte_carlo_moments


class _DictNet(nn.Module):
    def __init__(self, key: str = "logits"):
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.act = nn.Tanh()
        self.out = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 1)
        self.key = key

    def forward(self, x):
        h = self.act(self.a(x))
        return {"aux": self.aux(h), self.key: self.out(h)}  # logits not first


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dict_with_logits_is_the_prediction(propagation, dtype):
    torch.manual_seed(0)
    model = _DictNet().to(dtype).eval()
    x = torch.randn(5, 4, dtype=dtype)
    gm = gapa.GAPA(model, layers=["act"], m=32, propagation=propagation).fit(
        torch.randn(200, 4, dtype=dtype))
    out = gm(x)
    assert torch.equal(out.mean, model(x)["logits"])
    assert out.var.shape == (5, 3) and bool((out.var > 0).all())
    mc = monte_carlo_moments(gm, x, 4000, generator=torch.Generator().manual_seed(0))
    assert mc.var.shape == out.var.shape
    ratio = float(out.var.sum() / mc.var.sum())
    assert 0.8 < ratio < 1.25


def test_dict_without_logits_is_refused_by_name():
    model = _DictNet(key="prediction").eval()
    gm = gapa.GAPA(model, layers=["act"], m=8).fit(torch.randn(20, 4))  # no logits at fit
    with pytest.raises(gapa.InputError, match="dict key"):
        gm(torch.randn(3, 4))
