"""One tensor on both sides of a binary operation (``h * h``, ``h + h``, ``h - h``, ``h / h``)
is one function of it, not a product of two independent draws: the rule must be its
delta-method variance, the Jacobian reference, not the independent-operand rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gapa
from gapa.testing import assert_rule_exact

DT = torch.float64


def _inplace_double(h):
    t = h.clone()
    return t.add_(t)


@pytest.mark.parametrize(
    "fn",
    [
        lambda h: h * h,
        lambda h: h + h,
        lambda h: h - h + h.exp(),
        lambda h: h / h + h,
        lambda h: torch.mul(h, h),
        lambda h: torch.add(h, h, alpha=3.0),
        lambda h: torch.sub(h, h, alpha=0.5),
        lambda h: h.view(2, 3, 2) * h.view(2, 3, 2),  # two view objects of the same entries
        lambda h: h.t() * h.t(),
        _inplace_double,
    ],
    ids=["mul", "add", "sub", "div", "torch.mul", "add-alpha", "sub-alpha", "same-views",
         "same-transposes", "add_"],
)
def test_same_tensor_on_both_sides_is_its_delta_method(fn):
    x = torch.randn(6, 2, dtype=DT, generator=torch.Generator().manual_seed(0)) + 0.5
    assert_rule_exact(fn, x)


class _InplaceSquare(nn.Module):
    def forward(self, h):
        t = h.clone()
        return t.mul_(t)  # autograd cannot differentiate this, so no Jacobian reference


def test_inplace_self_product_is_the_square():
    x = torch.randn(4, 6, dtype=DT)
    var = torch.rand(4, 6, dtype=DT) + 0.5
    out = gapa.propagate(_InplaceSquare(), x, var)
    assert torch.equal(out.mean, x * x)
    torch.testing.assert_close(out.var, (2 * x) ** 2 * var, rtol=1e-12, atol=0)


def test_other_entries_of_one_storage_stay_independent_operands():
    """Different entries of one storage (a slice and another slice) are separate units."""
    x = torch.randn(4, 6, dtype=DT)
    var = torch.rand(4, 6, dtype=DT) + 0.5
    out = gapa.propagate(_Halves(), x, var)
    a, b = x[:, :3], x[:, 3:]
    want = b * b * var[:, :3] + a * a * var[:, 3:] + var[:, :3] * var[:, 3:]
    torch.testing.assert_close(out.var, want, rtol=1e-12, atol=0)


class _Halves(nn.Module):
    def forward(self, h):
        return h[:, :3] * h[:, 3:]


class _SquareHead(nn.Module):
    """A hand-written second moment after a GAPA layer: ``h * h``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.act = nn.Tanh()
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.act(self.a(x))
        return self.head(h * h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gapa_output_of_a_self_product_matches_its_square(dtype):
    """``h * h`` and ``h.square()`` are the same network: the same mean and variance."""
    torch.manual_seed(0)
    model = _SquareHead().to(dtype).eval()
    squared = _SquareHead().to(dtype).eval()
    squared.load_state_dict(model.state_dict())
    squared.forward = lambda x: squared.head(squared.act(squared.a(x)).square())
    train, x = torch.randn(200, 3, dtype=dtype), torch.randn(5, 3, dtype=dtype)
    out = gapa.GAPA(model, layers=["act"], m=32).fit(train)(x)
    ref = gapa.GAPA(squared, layers=["act"], m=32).fit(train)(x)
    assert torch.equal(out.mean, model(x))
    torch.testing.assert_close(out.var, ref.var)
