"""Variance rules of the convolution, normalisation, padding, interpolation, pooling and join
operations, each on its own (float64, independent inputs).

Two references:

- exact: for a linear op the diagonal rule is exact, ``diag(J diag(v) J^T) = (J * J) v``, with
  ``J`` the explicit Jacobian from autograd on a tiny input (:mod:`gapa.testing`): agreement
  to 1e-10;
- Monte Carlo (``monte_carlo_propagate``): with ``N`` draws, a sample variance has relative
  standard error ``sqrt(2 / (N - 1))``; the tolerance is 5 of those (about 1.1e-1 at N = 4000).
  This is the only reference for max pooling, whose first-order rule is exact in distribution
  while noise never changes a window's arg-max: the inputs keep gaps of 0.1 between values and
  the standard deviations are at most 1.5e-3.

The mean is checked bit for bit (``torch.equal``) against the plain op.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gapa.errors import UnsupportedOperationError
from gapa.propagation import VarianceTracker, propagate
from gapa.reference import monte_carlo_propagate
from gapa.testing import assert_rule_exact, jacobian_variance

Tensor = torch.Tensor
DT = torch.float64
EXACT = 1e-10
MC_SAMPLES = 4000
MC_RTOL = 5 * math.sqrt(2 / (MC_SAMPLES - 1))

_g = torch.Generator().manual_seed(0)


def _r(*shape) -> Tensor:
    return torch.randn(*shape, generator=_g, dtype=DT)


def _pos(*shape) -> Tensor:
    return 0.5 + torch.rand(*shape, generator=_g, dtype=DT)


# --- the cases: (id, fn, input shapes, which inputs are uncertain) ---------------------------

W1, B1 = _r(6, 2, 3), _r(6)
W1s = _r(4, 3, 3)
W2, B2 = _r(4, 3, 3, 2), _r(4)
W2dw = _r(4, 1, 3, 3)
W3, B3 = _r(3, 2, 2, 3, 2), _r(3)
WT1, BT1 = _r(3, 4, 3), _r(4)
WT2 = _r(4, 3, 3, 3)
WT2d = _r(2, 2, 2, 2)
WT3, BT3 = _r(2, 3, 2, 2, 2), _r(3)
BN_MEAN, BN_VAR, BN_W, BN_B = _r(3), _pos(3), _r(3), _r(3)
IDX = torch.tensor([2, 0, 2, 1])
GATHER_IDX = torch.randint(0, 4, (2, 3, 5), generator=_g)


def _bn(x, weight=BN_W, bias=BN_B):
    return F.batch_norm(x, BN_MEAN, BN_VAR, weight, bias, training=False, eps=1e-3)


U, D = True, False  # uncertain, deterministic

LINEAR_CASES = [
    ("conv1d", lambda x: F.conv1d(x, W1, B1, stride=2, padding=1, dilation=2, groups=2),
     [(2, 4, 9)], [U]),
    ("conv1d_same", lambda x: F.conv1d(x, W1s, None, 1, "same"), [(2, 3, 8)], [U]),
    ("conv2d", lambda x: F.conv2d(x, W2, B2, (2, 1), (1, 2), (1, 2)), [(2, 3, 7, 6)], [U]),
    ("conv2d_uncertain_bias", lambda x, b: F.conv2d(x, W2, b, padding=1),
     [(2, 3, 5, 4), (4,)], [U, U]),
    ("conv2d_only_bias", lambda x, b: F.conv2d(x, W2, b), [(1, 3, 4, 4), (4,)], [D, U]),
    ("conv2d_depthwise", lambda x: F.conv2d(x, W2dw, groups=4, padding=1), [(1, 4, 5, 5)], [U]),
    ("conv2d_unbatched", lambda x: F.conv2d(x, W2, B2), [(3, 5, 4)], [U]),
    ("conv3d", lambda x: F.conv3d(x, W3, B3, stride=(1, 2, 1), padding=1), [(1, 2, 5, 4, 4)],
     [U]),
    ("conv_transpose1d",
     lambda x: F.conv_transpose1d(x, WT1, BT1, stride=2, padding=1, output_padding=1),
     [(2, 3, 5)], [U]),
    ("conv_transpose2d",
     lambda x: F.conv_transpose2d(x, WT2, None, 2, 1, 1, 2), [(2, 4, 4, 3)], [U]),
    ("conv_transpose2d_dilated", lambda x: F.conv_transpose2d(x, WT2d, dilation=2),
     [(1, 2, 3, 3)], [U]),
    ("conv_transpose3d", lambda x: F.conv_transpose3d(x, WT3, BT3, stride=2),
     [(1, 2, 3, 3, 2)], [U]),
    ("batch_norm_2d", _bn, [(5, 3)], [U]),
    ("batch_norm_3d", _bn, [(2, 3, 4)], [U]),
    ("batch_norm_4d", _bn, [(2, 3, 4, 4)], [U]),
    ("batch_norm_5d", _bn, [(1, 3, 2, 2, 2)], [U]),
    ("batch_norm_no_affine", lambda x: _bn(x, None, None), [(2, 3, 4, 4)], [U]),
    ("batch_norm_uncertain_bias", lambda x, b: _bn(x, BN_W, b), [(2, 3, 4), (3,)], [U, U]),
    ("pad_constant", lambda x: F.pad(x, (1, 2, 0, 1), value=3.0), [(2, 2, 3, 4)], [U]),
    ("pad_constant_crop", lambda x: F.pad(x, (-1, 2)), [(2, 2, 5)], [U]),
    ("pad_reflect", lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect"), [(2, 2, 4, 4)], [U]),
    ("pad_replicate", lambda x: F.pad(x, (2, 3), "replicate"), [(2, 2, 4)], [U]),
    ("pad_circular", lambda x: F.pad(x, (1, 1, 2, 0), mode="circular"), [(1, 2, 3, 4)], [U]),
    ("nearest_scale", lambda x: F.interpolate(x, scale_factor=2), [(1, 2, 3, 4)], [U]),
    ("nearest_size", lambda x: F.interpolate(x, size=(7, 5)), [(1, 2, 4, 3)], [U]),
    ("nearest_exact", lambda x: F.interpolate(x, scale_factor=1.5, mode="nearest-exact"),
     [(2, 2, 5)], [U]),
    ("linear_size", lambda x: F.interpolate(x, size=9, mode="linear"), [(2, 2, 5)], [U]),
    ("linear_aligned", lambda x: F.interpolate(x, scale_factor=2.5, mode="linear",
                                               align_corners=True), [(1, 2, 4)], [U]),
    ("bilinear_size", lambda x: F.interpolate(x, (7, 5), mode="bilinear"), [(1, 2, 4, 3)], [U]),
    ("bilinear_scales", lambda x: F.interpolate(x, scale_factor=(1.5, 2.25), mode="bilinear"),
     [(2, 1, 4, 3)], [U]),
    ("bilinear_aligned", lambda x: F.interpolate(x, scale_factor=2, mode="bilinear",
                                                 align_corners=True), [(1, 2, 3, 3)], [U]),
    ("bilinear_recompute",
     lambda x: F.interpolate(x, scale_factor=(1.7, 0.6), mode="bilinear",
                             recompute_scale_factor=True), [(1, 2, 4, 6)], [U]),
    ("bicubic", lambda x: F.interpolate(x, scale_factor=2, mode="bicubic"), [(1, 2, 3, 4)], [U]),
    ("bicubic_aligned", lambda x: F.interpolate(x, (5, 7), mode="bicubic", align_corners=True),
     [(1, 1, 4, 4)], [U]),
    ("trilinear", lambda x: F.interpolate(x, scale_factor=(2, 1.5, 1), mode="trilinear"),
     [(1, 2, 2, 3, 3)], [U]),
    ("area", lambda x: F.interpolate(x, size=(3, 2), mode="area"), [(1, 2, 7, 5)], [U]),
    ("bilinear_antialias", lambda x: F.interpolate(x, (3, 2), mode="bilinear", antialias=True),
     [(1, 2, 8, 7)], [U]),
    ("bicubic_antialias", lambda x: F.interpolate(x, (4, 3), mode="bicubic", antialias=True),
     [(1, 1, 9, 7)], [U]),
    ("avg_pool1d", lambda x: F.avg_pool1d(x, 3, 2, 1, ceil_mode=True), [(2, 2, 8)], [U]),
    ("avg_pool1d_exclude_pad", lambda x: F.avg_pool1d(x, 3, 2, 1, True, False), [(2, 2, 8)],
     [U]),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, (3, 2), 2, 1, ceil_mode=True), [(2, 2, 6, 5)], [U]),
    ("avg_pool2d_exclude_pad",
     lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
     [(2, 2, 6, 6)], [U]),
    ("avg_pool2d_divisor", lambda x: F.avg_pool2d(x, 2, padding=1, divisor_override=5),
     [(1, 2, 5, 4)], [U]),
    ("avg_pool2d_unbatched", lambda x: F.avg_pool2d(x, 2), [(2, 4, 6)], [U]),
    ("avg_pool3d", lambda x: F.avg_pool3d(x, 2, (1, 2, 2), 1, ceil_mode=True),
     [(1, 2, 3, 5, 4)], [U]),
    ("avg_pool3d_divisor", lambda x: F.avg_pool3d(x, 2, divisor_override=3), [(1, 2, 4, 4, 4)],
     [U]),
    ("adaptive_avg_pool1d", lambda x: F.adaptive_avg_pool1d(x, 3), [(2, 2, 7)], [U]),
    ("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (3, 4)), [(2, 2, 7, 5)], [U]),
    ("adaptive_avg_pool2d_none", lambda x: F.adaptive_avg_pool2d(x, (None, 2)), [(1, 2, 3, 5)],
     [U]),
    ("adaptive_avg_pool2d_global", lambda x: F.adaptive_avg_pool2d(x, 1), [(2, 3, 5, 4)], [U]),
    ("adaptive_avg_pool3d", lambda x: F.adaptive_avg_pool3d(x, (2, 3, 2)), [(1, 2, 5, 4, 3)],
     [U]),
    ("cat", lambda a, b, c: torch.cat([a, b, c], dim=1), [(2, 2, 3), (2, 1, 3), (2, 3, 3)],
     [U, D, U]),
    ("cat_kwargs", lambda a, b: torch.cat(tensors=(a, b), dim=-1), [(2, 3), (2, 2)], [D, U]),
    ("concat", lambda a, b: torch.concat([a, b]), [(2, 3), (1, 3)], [U, U]),
    ("concatenate", lambda a, b: torch.concatenate([a, b], 1), [(2, 3), (2, 1)], [U, D]),
    ("stack", lambda a, b: torch.stack([a, b], dim=-1), [(2, 3), (2, 3)], [D, U]),
    ("hstack", lambda a, b: torch.hstack([a, b]), [(2, 3), (2, 2)], [U, D]),
    ("vstack", lambda a, b: torch.vstack([a, b]), [(3,), (2, 3)], [U, U]),
    ("dstack", lambda a, b: torch.dstack([a, b]), [(2, 3), (2, 3)], [D, U]),
    ("split", lambda x: torch.split(x, [2, 3], dim=1), [(2, 5, 3)], [U]),
    ("tensor_split_method", lambda x: x.split(2), [(5, 3)], [U]),
    ("tensor_split", lambda x: torch.tensor_split(x, 3, dim=-1), [(2, 7)], [U]),
    ("chunk", lambda x: torch.chunk(x, 3, dim=-1), [(2, 3, 7)], [U]),
    ("chunk_method", lambda x: x.chunk(2, 1), [(2, 4)], [U]),
    ("unbind", lambda x: torch.unbind(x, 1), [(2, 3, 2)], [U]),
    ("unbind_method", lambda x: x.unbind(), [(3, 2)], [U]),
    ("narrow", lambda x: torch.narrow(x, 1, 1, 2), [(2, 4, 3)], [U]),
    ("narrow_method", lambda x: x.narrow(-1, 0, 2), [(2, 4, 3)], [U]),
    ("select", lambda x: x.select(1, 2), [(2, 4, 3)], [U]),
    ("select_function", lambda x: torch.select(x, 0, 1), [(2, 4)], [U]),
    ("flip", lambda x: torch.flip(x, (0, 2)), [(2, 3, 4)], [U]),
    ("flip_method", lambda x: x.flip(-1), [(2, 3)], [U]),
    ("fliplr", lambda x: torch.fliplr(x), [(2, 3)], [U]),
    ("flipud", lambda x: torch.flipud(x), [(2, 3)], [U]),
    ("roll", lambda x: torch.roll(x, (1, -2), (1, 2)), [(2, 3, 4)], [U]),
    ("roll_flat", lambda x: x.roll(3), [(2, 3)], [U]),
    ("repeat", lambda x: x.repeat(2, 1, 3), [(2, 3)], [U]),
    ("tile", lambda x: torch.tile(x, (2,)), [(2, 3)], [U]),
    ("repeat_interleave", lambda x: torch.repeat_interleave(x, 2, dim=1), [(2, 3)], [U]),
    ("repeat_interleave_method", lambda x: x.repeat_interleave(torch.tensor([1, 3]), dim=0),
     [(2, 3)], [U]),
    ("index_select", lambda x: torch.index_select(x, 1, IDX), [(2, 3, 2)], [U]),
    ("index_select_method", lambda x: x.index_select(0, IDX), [(3, 2)], [U]),
    ("gather", lambda x: torch.gather(x, -1, GATHER_IDX), [(2, 3, 4)], [U]),
    ("gather_method", lambda x: x.gather(1, GATHER_IDX[:, :2, :3].clamp(max=2)), [(2, 3, 4)], [U]),
    ("take_along_dim", lambda x: torch.take_along_dim(x, GATHER_IDX, dim=2), [(2, 3, 4)], [U]),
]

MAX_POOL_CASES = [
    ("max_pool1d", lambda x: F.max_pool1d(x, 3, 2, 1, ceil_mode=True), (2, 2, 8)),
    ("max_pool2d", lambda x: F.max_pool2d(x, (3, 2), 2, 1, dilation=(1, 2)), (2, 2, 6, 7)),
    ("max_pool2d_indices", lambda x: F.max_pool2d(x, 2, return_indices=True), (2, 2, 6, 5)),
    ("max_pool2d_unbatched", lambda x: F.max_pool2d(x, 2), (2, 4, 6)),
    ("max_pool3d", lambda x: F.max_pool3d(x, 2, padding=1), (1, 2, 3, 4, 4)),
    ("max_pool3d_indices", lambda x: F.max_pool3d(x, 2, return_indices=True), (1, 2, 4, 4, 2)),
    ("adaptive_max_pool1d", lambda x: F.adaptive_max_pool1d(x, 3), (2, 2, 7)),
    ("adaptive_max_pool1d_indices", lambda x: F.adaptive_max_pool1d(x, 3, True), (2, 2, 7)),
    ("adaptive_max_pool2d", lambda x: F.adaptive_max_pool2d(x, (3, 2)), (2, 2, 7, 5)),
    ("adaptive_max_pool2d_indices",
     lambda x: F.adaptive_max_pool2d(x, 2, return_indices=True), (2, 2, 5, 5)),
    ("adaptive_max_pool3d", lambda x: F.adaptive_max_pool3d(x, (2, 1, 2)), (1, 2, 3, 3, 4)),
]


# --- helpers ----------------------------------------------------------------------------------


def _inputs(shapes, uncertain, seed: int):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g, dtype=DT) for s in shapes]
    vs = [0.5 + torch.rand(s, generator=g, dtype=DT) if u else None
          for s, u in zip(shapes, uncertain, strict=True)]
    return xs, vs


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def tracked(fn, xs, vs):
    """Run ``fn`` under a tracker with the given input variances: (outputs, their variances)."""
    tr = VarianceTracker()
    for x, v in zip(xs, vs, strict=True):
        if v is not None:
            tr.set_var(x, v)
    with torch.no_grad(), tr:
        outs = _as_tuple(fn(*xs))
    return outs, [tr.var(o) for o in outs]


def _flat_values(outs) -> Tensor:
    return torch.cat([o.reshape(-1) for o in outs if o.is_floating_point()])


def _flat_variances(outs, variances) -> Tensor:
    return torch.cat([(v if v is not None else torch.zeros_like(o)).reshape(-1)
                      for o, v in zip(outs, variances, strict=True) if o.is_floating_point()])


def _mc_variance(fn, xs, vs, gen) -> Tensor:
    """Monte-Carlo variance of the flattened outputs: the uncertain inputs are packed into one
    row, and ``vmap`` maps the op over the rows, so that any op (batched or not) takes all the
    draws in one call of ``monte_carlo_propagate``."""
    idx = [i for i, v in enumerate(vs) if v is not None]
    mean = torch.cat([xs[i].reshape(-1) for i in idx]).unsqueeze(0)
    var = torch.cat([vs[i].reshape(-1) for i in idx]).unsqueeze(0)

    def packed(z: Tensor) -> Tensor:
        args, start = list(xs), 0
        for i in idx:
            n = xs[i].numel()
            args[i] = z[start:start + n].reshape(xs[i].shape)
            start += n
        return _flat_values(_as_tuple(fn(*args)))

    with warnings.catch_warnings():  # vmap's "performance drop" for ops without a batch rule
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
        return monte_carlo_propagate(torch.vmap(packed), mean, var, MC_SAMPLES, generator=gen,
                                     chunk=MC_SAMPLES).var[0]


# --- linear ops: exact ----------------------------------------------------------------------


@pytest.mark.parametrize(("fn", "shapes", "uncertain"), [c[1:] for c in LINEAR_CASES],
                         ids=[c[0] for c in LINEAR_CASES])
def test_linear_rule_is_exact(fn, shapes, uncertain):
    xs, vs = _inputs(shapes, uncertain, seed=1)
    variances = _as_tuple(assert_rule_exact(fn, *xs, var=vs, rtol=EXACT, atol=EXACT))
    assert all(v is not None for v in variances)


# dilated float64 convolutions are slow under vmap (seconds per case); the same rule runs on the
# other convolution cases here, and on these two in the exact test above
MC_CASES = [c for c in LINEAR_CASES if c[0] not in ("conv1d", "conv2d")]


@pytest.mark.parametrize(("fn", "shapes", "uncertain"), [c[1:] for c in MC_CASES],
                         ids=[c[0] for c in MC_CASES])
def test_linear_rule_matches_monte_carlo(fn, shapes, uncertain, gen):
    xs, vs = _inputs(shapes, uncertain, seed=2)
    outs, variances = tracked(fn, xs, vs)
    mc = _mc_variance(fn, xs, vs, gen)
    torch.testing.assert_close(_flat_variances(outs, variances), mc, rtol=MC_RTOL, atol=1e-14)


# --- max pooling: first order, against Monte Carlo ----------------------------------------


@pytest.mark.parametrize(("fn", "shape"), [c[1:] for c in MAX_POOL_CASES],
                         ids=[c[0] for c in MAX_POOL_CASES])
def test_max_pool_matches_monte_carlo(fn, shape, gen):
    n = math.prod(shape)
    # distinct values 0.1 apart and standard deviations <= 1.5e-3: the arg-max never flips
    x = (torch.randperm(n, generator=gen).to(DT) * 0.1).reshape(shape)
    v = 1e-6 * (0.5 + torch.rand(shape, generator=gen, dtype=DT) * 1.5)
    outs, variances = tracked(fn, [x], [v])
    plain = _as_tuple(fn(x))
    assert len(outs) == len(plain)
    for o, p in zip(outs, plain, strict=True):
        assert torch.equal(o, p)
    if len(outs) == 2:  # return_indices: the indices carry no variance
        assert variances[1] is None and outs[1].dtype == torch.int64
    assert variances[0].shape == outs[0].shape
    mc = _mc_variance(lambda t: _as_tuple(fn(t))[0], [x], [v], gen)
    torch.testing.assert_close(variances[0].reshape(-1), mc, rtol=MC_RTOL, atol=0)


def test_max_pool_picks_the_argmax_variance():
    """A hand-checkable case: each window's variance is its largest element's."""
    x = torch.tensor([[[1.0, 3.0, 2.0, 0.0]]], dtype=DT)
    v = torch.tensor([[[10.0, 20.0, 30.0, 40.0]]], dtype=DT)
    _, (var,) = tracked(lambda t: F.max_pool1d(t, 2), [x], [v])
    assert var.tolist() == [[[20.0, 30.0]]]


# --- modules dispatch to the rules ----------------------------------------------------------


def _batch_norm_module(cls, c: int) -> nn.Module:
    bn = cls(c).double().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=DT))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=DT))
        bn.weight.copy_(torch.randn(c, generator=g, dtype=DT))
        bn.bias.copy_(torch.randn(c, generator=g, dtype=DT))
    return bn


MODULES = [
    ("Conv1d", lambda: nn.Conv1d(2, 3, 3, padding=1), (2, 2, 6)),
    ("Conv2d_circular", lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
     (1, 2, 5, 4)),
    ("Conv3d", lambda: nn.Conv3d(2, 2, 2, stride=2), (1, 2, 4, 4, 4)),
    ("ConvTranspose1d", lambda: nn.ConvTranspose1d(2, 3, 2, stride=2), (2, 2, 4)),
    ("ConvTranspose2d", lambda: nn.ConvTranspose2d(2, 3, 2, stride=2), (1, 2, 3, 3)),
    ("ConvTranspose3d", lambda: nn.ConvTranspose3d(2, 1, 2, stride=2), (1, 2, 2, 2, 2)),
    ("BatchNorm1d", lambda: _batch_norm_module(nn.BatchNorm1d, 3), (4, 3)),
    ("BatchNorm2d", lambda: _batch_norm_module(nn.BatchNorm2d, 3), (2, 3, 3, 3)),
    ("BatchNorm3d", lambda: _batch_norm_module(nn.BatchNorm3d, 2), (1, 2, 2, 3, 2)),
    ("ZeroPad2d", lambda: nn.ZeroPad2d((1, 0, 2, 1)), (1, 2, 3, 3)),
    ("ReflectionPad1d", lambda: nn.ReflectionPad1d(2), (1, 2, 4)),
    ("ReplicationPad2d", lambda: nn.ReplicationPad2d(1), (1, 2, 3, 3)),
    ("Upsample_nearest", lambda: nn.Upsample(scale_factor=2), (1, 2, 3, 3)),
    ("Upsample_bilinear", lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (1, 2, 3, 3)),
    ("UpsamplingBilinear2d", lambda: nn.UpsamplingBilinear2d(scale_factor=2), (1, 2, 3, 3)),
    ("AvgPool1d", lambda: nn.AvgPool1d(3, 2, 1), (1, 2, 7)),
    ("AvgPool2d", lambda: nn.AvgPool2d(2, ceil_mode=True), (1, 2, 5, 5)),
    ("AvgPool3d", lambda: nn.AvgPool3d(2), (1, 1, 4, 4, 2)),
    ("AdaptiveAvgPool1d", lambda: nn.AdaptiveAvgPool1d(2), (1, 2, 5)),
    ("AdaptiveAvgPool2d", lambda: nn.AdaptiveAvgPool2d(1), (2, 2, 3, 3)),
    ("AdaptiveAvgPool3d", lambda: nn.AdaptiveAvgPool3d(2), (1, 1, 3, 3, 3)),
]


@pytest.mark.parametrize(("make", "shape"), [c[1:] for c in MODULES], ids=[c[0] for c in MODULES])
def test_modules_dispatch_to_the_rules(make, shape):
    torch.manual_seed(4)
    module = make().double().eval()
    xs, vs = _inputs([shape], [U], seed=5)
    assert_rule_exact(module, xs[0], var=vs[0], rtol=EXACT, atol=EXACT)


MAX_MODULES = [
    ("MaxPool1d", nn.MaxPool1d(2), (1, 2, 6)),
    ("MaxPool2d", nn.MaxPool2d(2), (1, 2, 4, 4)),
    ("MaxPool2d_indices", nn.MaxPool2d(2, return_indices=True), (1, 2, 4, 4)),
    ("MaxPool3d", nn.MaxPool3d(2), (1, 1, 2, 4, 4)),
    ("AdaptiveMaxPool1d", nn.AdaptiveMaxPool1d(3), (1, 2, 6)),
    ("AdaptiveMaxPool2d", nn.AdaptiveMaxPool2d(2), (1, 2, 4, 4)),
    ("AdaptiveMaxPool3d", nn.AdaptiveMaxPool3d(1), (1, 1, 2, 4, 4)),
]


@pytest.mark.parametrize(("module", "shape"), [c[1:] for c in MAX_MODULES],
                         ids=[c[0] for c in MAX_MODULES])
def test_max_pool_modules_dispatch_to_the_rule(module, shape, gen):
    x = (torch.randperm(math.prod(shape), generator=gen).to(DT)).reshape(shape)
    v = torch.rand(shape, generator=gen, dtype=DT)
    out = propagate(module, x, v)
    values = _as_tuple(module(x))[0]
    assert torch.equal(out.mean, values)
    # the arg-max of a window of distinct values is where the value is found in the input
    flat_x, flat_v = x.flatten(2), v.flatten(2)
    where = (flat_x.unsqueeze(-1) == values.flatten(2).unsqueeze(-2)).to(DT)
    expected = (flat_v.unsqueeze(-1) * where).sum(-2).reshape(values.shape)
    torch.testing.assert_close(out.var, expected, rtol=0, atol=0)


# --- refusals -------------------------------------------------------------------------------


def _uncertain_weight(fn, weight_shape):
    x, w = _r(1, 2, 4, 4), _r(*weight_shape)
    tr = VarianceTracker()
    tr.set_var(x, torch.ones_like(x))
    tr.set_var(w, torch.ones_like(w))
    with torch.no_grad(), tr:
        fn(x, w)


@pytest.mark.parametrize(
    ("fn", "weight_shape"),
    [(F.conv2d, (3, 2, 3, 3)), (F.conv_transpose2d, (2, 3, 2, 2)),
     (lambda x, w: F.linear(x, w), (5, 4))],
    ids=["conv2d", "conv_transpose2d", "linear"],
)
def test_uncertain_weight_is_refused(fn, weight_shape):
    with pytest.raises(UnsupportedOperationError, match="uncertain weight"):
        _uncertain_weight(fn, weight_shape)


def test_batch_norm_in_training_mode_is_refused():
    bn = _batch_norm_module(nn.BatchNorm2d, 2).train()
    x = _r(3, 2, 3, 3)
    with pytest.raises(UnsupportedOperationError, match="batch statistics"):
        propagate(bn, x, torch.ones_like(x))


def test_batch_norm_without_running_statistics_is_refused():
    bn = nn.BatchNorm2d(2, track_running_stats=False).double().eval()
    x = _r(3, 2, 3, 3)
    with pytest.raises(UnsupportedOperationError, match="batch statistics"):
        propagate(bn, x, torch.ones_like(x))


def test_batch_norm_with_uncertain_statistics_is_refused():
    x, rv = _r(2, 3), _pos(3)
    tr = VarianceTracker()
    tr.set_var(x, torch.ones_like(x))
    tr.set_var(rv, torch.ones_like(rv))
    with pytest.raises(UnsupportedOperationError, match="running statistics"), tr:
        F.batch_norm(x, torch.zeros(3, dtype=DT), rv)


def test_reflect_padded_conv_is_the_composition_of_exact_rules():
    """``padding_mode="reflect"`` pads (exact) then convolves (exact), but a border window sees
    one input element twice, and the diagonal rule counts the copies as independent: the
    composition is exact away from the border and first order with dropped covariances at it."""
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect").double().eval()
    xs, vs = _inputs([(1, 2, 6, 5)], [U], seed=7)
    out = propagate(conv, xs[0], vs[0])
    composed = F.conv2d(F.pad(vs[0], (1, 1, 1, 1), mode="reflect"), conv.weight.square())
    torch.testing.assert_close(out.var, composed, rtol=EXACT, atol=EXACT)
    exact = jacobian_variance(conv, *xs, var=vs)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(out.var[inner], exact[inner], rtol=EXACT, atol=EXACT)
    assert not torch.allclose(out.var, exact)
