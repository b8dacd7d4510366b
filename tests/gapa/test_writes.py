"""Writes into tensors (assignment, in-place operations, views, ``out=``) carry the variance of
what they write: checked against the exact diagonal ``sum_j J_ij^2 v_j`` of each (linear)
write, computed by autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gapa
from gapa.propagation import propagate


def _assign(h):
    buf = torch.zeros(h.shape[0], 32, dtype=h.dtype)
    buf[:, :] = h
    return buf


def _iadd_slice(h):
    buf = torch.ones(h.shape[0], 32, dtype=h.dtype)
    buf[:, :16] += h[:, :16]
    return buf


def _zero_slice(h):
    h = h * 1.0
    h[:, :16] = 0.0
    return h


def _copy(h):
    buf = torch.zeros(h.shape[0], 32, dtype=h.dtype)
    buf.copy_(h)
    return buf


def _copy_into_view(h):
    buf = torch.zeros(h.shape[0], 40, dtype=h.dtype)
    buf[:, 4:36].copy_(h)
    return buf


def _view_inplace(h):
    h = h * 1.0
    h[:, :16].mul_(2.0)
    return h


def _view_zero(h):
    h = h * 1.0
    view = h[:, 8:24]
    view.zero_()
    return h


def _index_put(h):
    buf = torch.zeros(h.shape[0], 40, dtype=h.dtype)
    buf.index_put_((torch.arange(h.shape[0])[:, None], torch.arange(4, 36)[None, :]), h)
    return buf


def _index_put_accumulate(h):
    buf = torch.ones(h.shape[0], 32, dtype=h.dtype)
    rows, cols = torch.arange(h.shape[0])[:, None], torch.arange(16)[None, :]
    buf.index_put_((rows, cols), h[:, :16], accumulate=True)
    buf.index_put_((rows, cols + 16), 3.0 * h[:, 16:], accumulate=True)
    return buf


def _masked_fill_view(h):
    h = h * 1.0
    mask = torch.zeros(h.shape[0], 16, dtype=torch.bool)
    mask[:, ::2] = True
    h[:, 16:].masked_fill_(mask, 3.0)
    return h


def _scatter(h):
    buf = torch.zeros(h.shape[0], 64, dtype=h.dtype)
    idx = (2 * torch.arange(32)).expand(h.shape[0], 32)
    buf.scatter_(1, idx, h)
    return buf


def _scatter_add(h):
    buf = torch.ones(h.shape[0], 16, dtype=h.dtype)
    idx = (torch.arange(32) // 2).expand(h.shape[0], 32)
    buf.scatter_add_(1, idx, h)
    return buf


def _index_add(h):
    buf = torch.zeros(h.shape[0], 32, dtype=h.dtype)
    buf.index_add_(0, torch.arange(h.shape[0]), h, alpha=2.0)
    return buf


def _index_copy_fill(h):
    buf = torch.ones(h.shape[0], 32, dtype=h.dtype)
    buf.index_copy_(1, torch.arange(32), h)
    buf.index_fill_(1, torch.tensor([0, 5]), 7.0)
    return buf


def _out_argument(h):
    buf = torch.empty(h.shape[0], 32, dtype=h.dtype)
    torch.mul(h, 3.0, out=buf)
    return buf


def _out_into_view(h):
    buf = torch.zeros(h.shape[0], 48, dtype=h.dtype)
    torch.add(h, 1.0, out=buf[:, 8:40])
    return buf


#: autograd refuses out=: the same function without it, for the reference Jacobian
DIFFERENTIABLE = {
    _out_argument: lambda h: h * 3.0,
    _out_into_view: lambda h: torch.cat([torch.zeros_like(h[:, :8]), h + 1.0,
                                         torch.zeros_like(h[:, :8])], dim=1),
}


def _view_made_before_write(h):
    buf = torch.zeros(h.shape[0], 32, dtype=h.dtype)
    tail = buf[:, 8:]
    buf.copy_(h)
    return tail * 1.0


def _transposed_view(h):
    buf = torch.zeros(32, h.shape[0], dtype=h.dtype)
    buf.t()[:, :] = h
    return buf.t() * 1.0


def _inplace_activation_on_view(h):
    wide = torch.cat([h, h.detach() * 0.0], dim=1) * 1.0
    torch.relu_(wide[:, :32])
    return wide


WRITES = [_assign, _iadd_slice, _zero_slice, _copy, _copy_into_view, _view_inplace, _view_zero,
          _index_put, _index_put_accumulate, _masked_fill_view, _scatter, _scatter_add,
          _index_add, _index_copy_fill, _out_argument, _out_into_view,
          _view_made_before_write, _transposed_view, _inplace_activation_on_view]


class Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


def exact_diagonal(fn, x: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``sum_j J_ij^2 v_j`` for each row (rows independent) with the Jacobian by autograd."""
    rows = []
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda r: fn(r[None])[0], x[i : i + 1][0])
        rows.append(jac.square() @ var[i])
    return torch.stack(rows)


@pytest.mark.parametrize("fn", WRITES, ids=lambda f: f.__name__.strip("_"))
def test_write_carries_the_written_variance(fn):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    var = torch.rand(3, 32, generator=gen, dtype=torch.float64) + 0.5
    out = propagate(Wrap(fn), x, var)
    assert torch.equal(out.mean, fn(x))
    exact = exact_diagonal(DIFFERENTIABLE.get(fn, fn), x, var)
    torch.testing.assert_close(out.var, exact, rtol=1e-12, atol=1e-12)


def test_untracked_write_is_refused_not_read_stale():
    """A write through an alias the tracker cannot connect to its source (``detach`` shares
    storage and version but is no view) makes the source's variance stale: refused."""

    def fn(h):
        h = h * 1.0
        alias = h.detach()
        alias.zero_()
        return h + 1.0

    with pytest.raises(gapa.UnsupportedOperationError, match="stale"):
        propagate(Wrap(fn), torch.randn(2, 4), torch.ones(2, 4))


def test_write_with_unsupported_reduce_is_refused():
    def fn(h):
        buf = torch.ones(h.shape[0], 4)
        return buf.scatter_(1, torch.zeros(h.shape[0], 4, dtype=torch.long), h, reduce="multiply")

    with pytest.raises(gapa.UnsupportedOperationError, match="reduce='multiply'"):
        propagate(Wrap(fn), torch.randn(2, 4), torch.ones(2, 4))


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
def test_gapa_layer_feeding_writes(propagation):
    """A GAPA layer whose output is written into a buffer (the pattern of hand-written heads):
    the variance reaches the output, exactly (each unit reaches the output once, so the
    diagonal rule is exact too)."""
    torch.manual_seed(0)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(3, 16), nn.Tanh(), nn.Linear(24, 2)

        def forward(self, x):
            h = self.act(self.fc1(x))
            buf = torch.zeros(x.shape[0], 24)
            buf[:, 4:20] = h
            buf[:, :4] = 1.0
            buf[:, 8:12] *= 0.5
            return self.fc2(buf)

    model = Head().eval()
    gm = gapa.GAPA(model, layers=["act"], m=None, propagation=propagation)
    gm.fit(torch.randn(200, 3), progress=False)
    x = 3 * torch.randn(5, 3)
    out = gm(x)
    assert torch.equal(out.mean, model(x))
    h_var = gm.sites["act"].variance(gm.pre_activations(x)["act"])
    jac = model.fc2.weight.detach()[:, 4:20].clone()
    jac[:, 4:8] *= 0.5
    torch.testing.assert_close(out.var, h_var @ jac.square().T, rtol=1e-5, atol=1e-8)


def _out_of_place_writes(h):
    rows, cols = torch.arange(h.shape[0])[:, None], torch.arange(8)[None, :]
    put = h.index_put((rows, cols), 2.0 * h[:, :8])
    scattered = h.scatter(1, cols.expand(h.shape[0], 8), h[:, 8:16])
    return torch.cat([h, put, scattered], dim=1)  # h itself keeps its own variance


def _loop_fill(h):
    buf = h.new_zeros(h.shape[0], 32)
    for i in range(32):
        buf[:, i] = h[:, 31 - i] * (i + 1)
    return buf


@pytest.mark.parametrize("fn", [_out_of_place_writes, _loop_fill], ids=lambda f: f.__name__)
def test_more_writes(fn):
    test_write_carries_the_written_variance(fn)


class InPlaceOnView(nn.Module):
    """A GAPA activation applied in place to a view of a larger tensor, whose base the network
    reads afterwards; ``inplace=False`` is the same function written out of place."""

    def __init__(self, inplace: bool, view: str):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.a1, self.fc2 = nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16)
        self.a2, self.head = nn.ReLU(inplace=inplace), nn.Linear(16, 2)
        self.inplace, self.view = inplace, view

    def forward(self, x):
        h = self.fc2(self.a1(self.fc1(x)))
        if self.view == "slice":  # not contiguous
            if self.inplace:
                self.a2(h[:, :8])
            else:
                h = torch.cat([self.a2(h[:, :8]), h[:, 8:]], dim=1)
        elif self.inplace:  # a contiguous view
            self.a2(h.view(-1, 4, 4))
        else:
            h = self.a2(h.view(-1, 4, 4)).view(-1, 16)
        return self.head(h)


@pytest.mark.parametrize(("view", "layers"), [("slice", ["a2"]), ("slice", ["a1", "a2"]),
                                              ("reshape", ["a1", "a2"])])
def test_gapa_activation_in_place_on_a_view(view, layers):
    """The GP variance of an activation applied in place to a view reaches the base the
    network reads: the same numbers as the out-of-place network."""
    x_train, x = torch.randn(300, 3), 2 * torch.randn(6, 3)
    outs = {}
    for inplace in (True, False):
        model = InPlaceOnView(inplace, view).eval()
        gm = gapa.GAPA(model, layers=layers, m=None).fit(x_train, progress=False)
        outs[inplace] = gm(x)
    assert torch.equal(outs[True].mean, outs[False].mean)
    assert bool((outs[False].var > 0).all())
    torch.testing.assert_close(outs[True].var, outs[False].var, rtol=1e-6, atol=0)
    model = InPlaceOnView(True, view).eval()
    jacobian = gapa.GAPA(model, layers=layers, m=None, propagation="jacobian")
    with pytest.raises(gapa.UnsupportedOperationError, match="view of another tensor"):
        jacobian.fit(x_train, progress=False)(x)
