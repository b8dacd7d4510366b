"""The propagation rule API: no silent re-registration, rules for one call, the argument
helper, operation aliases, and :mod:`gapa.testing` (the Jacobian check users run on their rules)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gapa
import gapa.propagation as gp
from gapa.errors import ConfigurationError, UnsupportedOperationError
from gapa.propagation import engine
from gapa.testing import assert_rule_exact, jacobian_variance, rules_restored

DT = torch.float64
Tensor = torch.Tensor

#: Every function with a rule before the rule API (spelled torch.X, Tensor.X or F.X): aliases()
#: may add spellings, never drop one.
_BEFORE = """
    torch.add Tensor.add Tensor.__add__ Tensor.__radd__ Tensor.add_ Tensor.__iadd__ torch.sub
    Tensor.sub Tensor.__sub__ Tensor.sub_ Tensor.__isub__ Tensor.__rsub__ torch.mul Tensor.mul
    Tensor.__mul__ Tensor.__rmul__ Tensor.mul_ Tensor.__imul__ torch.div Tensor.div
    Tensor.__truediv__ Tensor.div_ Tensor.__idiv__ torch.neg Tensor.neg Tensor.positive
    torch.positive torch.matmul Tensor.matmul Tensor.__matmul__ Tensor.__rmatmul__ torch.mm
    Tensor.mm torch.bmm Tensor.bmm torch.addmm Tensor.addmm torch.baddbmm Tensor.baddbmm
    torch.einsum F.softmax torch.softmax Tensor.softmax F.log_softmax torch.log_softmax
    Tensor.log_softmax F.scaled_dot_product_attention torch.tanh Tensor.tanh F.tanh torch.sigmoid
    Tensor.sigmoid F.sigmoid F.relu torch.relu Tensor.relu torch.relu_ Tensor.relu_ F.gelu F.silu
    F.elu F.leaky_relu F.softplus F.mish F.selu F.celu F.hardtanh F.hardswish F.hardsigmoid
    F.relu6 F.logsigmoid F.softsign F.tanhshrink F.dropout F.dropout1d F.dropout2d F.dropout3d
    F.alpha_dropout F.linear torch.conv1d torch.conv2d torch.conv3d torch.conv_transpose1d
    torch.conv_transpose2d torch.conv_transpose3d F.batch_norm F.pad F.interpolate torch.cat
    torch.concat torch.concatenate torch.stack torch.hstack torch.vstack torch.dstack torch.split
    Tensor.split torch.tensor_split Tensor.tensor_split torch.chunk Tensor.chunk torch.unbind
    Tensor.unbind torch.narrow Tensor.narrow torch.select Tensor.select torch.flip Tensor.flip
    torch.fliplr torch.flipud torch.roll Tensor.roll Tensor.repeat torch.tile Tensor.tile
    torch.repeat_interleave Tensor.repeat_interleave torch.index_select Tensor.index_select
    torch.gather Tensor.gather torch.take_along_dim Tensor.take_along_dim F.layer_norm
    torch.layer_norm F.group_norm torch.group_norm F.rms_norm torch.rms_norm torch.avg_pool1d
    F.avg_pool2d F.avg_pool3d torch.adaptive_avg_pool1d F.adaptive_avg_pool2d
    F.adaptive_avg_pool3d F.max_pool1d F.max_pool2d F.max_pool3d F.adaptive_max_pool1d
    F.adaptive_max_pool2d F.adaptive_max_pool3d F.max_pool1d_with_indices
    F.max_pool2d_with_indices F.max_pool3d_with_indices F.adaptive_max_pool1d_with_indices
    F.adaptive_max_pool2d_with_indices F.adaptive_max_pool3d_with_indices torch.sum Tensor.sum
    torch.mean Tensor.mean Tensor.view Tensor.reshape torch.reshape torch.flatten Tensor.flatten
    Tensor.unflatten torch.permute Tensor.permute torch.transpose Tensor.transpose Tensor.t
    torch.t Tensor.contiguous Tensor.clone torch.clone Tensor.squeeze torch.squeeze
    Tensor.unsqueeze torch.unsqueeze Tensor.__getitem__ Tensor.expand Tensor.to Tensor.float
    Tensor.double Tensor.detach torch.detach Tensor.view_as Tensor.reshape_as torch.exp Tensor.exp
    Tensor.exp_ torch.exp_ torch.log Tensor.log Tensor.log_ torch.log_ torch.log1p Tensor.log1p
    Tensor.log1p_ torch.expm1 Tensor.expm1 Tensor.expm1_ torch.sqrt Tensor.sqrt Tensor.sqrt_
    torch.sqrt_ torch.rsqrt Tensor.rsqrt Tensor.rsqrt_ torch.rsqrt_ torch.reciprocal
    Tensor.reciprocal Tensor.reciprocal_ torch.square Tensor.square Tensor.square_ torch.square_
    torch.abs torch.absolute Tensor.abs Tensor.absolute Tensor.abs_ Tensor.absolute_ torch.abs_
    torch.sin Tensor.sin Tensor.sin_ torch.sin_ torch.cos Tensor.cos Tensor.cos_ torch.cos_
    torch.erf Tensor.erf Tensor.erf_ torch.pow Tensor.pow Tensor.__pow__ Tensor.pow_
    Tensor.__ipow__ Tensor.__rpow__ torch.clamp torch.clip Tensor.clamp Tensor.clip Tensor.clamp_
    Tensor.clip_ torch.clamp_ torch.clip_ torch.clamp_min Tensor.clamp_min Tensor.clamp_min_
    torch.clamp_min_ torch.clamp_max Tensor.clamp_max Tensor.clamp_max_ torch.clamp_max_
    torch.where Tensor.where Tensor.masked_fill Tensor.masked_fill_ torch.masked_fill
    Tensor.type_as Tensor.type Tensor.half Tensor.bfloat16 torch.zeros_like torch.ones_like
    torch.full_like torch.empty_like Tensor.new_zeros Tensor.new_ones Tensor.new_full
    Tensor.new_empty Tensor.new_tensor Tensor.__setitem__ Tensor.copy_ Tensor.fill_ Tensor.zero_
    torch.fill_ torch.zero_ Tensor.index_put_ Tensor.index_put torch.index_put_ torch.index_put
    Tensor.scatter_ Tensor.scatter torch.scatter Tensor.scatter_add_ Tensor.scatter_add
    torch.scatter_add Tensor.index_copy_ Tensor.index_copy torch.index_copy Tensor.index_add_
    Tensor.index_add torch.index_add Tensor.index_fill_ Tensor.index_fill torch.index_fill
"""
REGISTERED_BEFORE = _BEFORE.split()

RULE_MODULES = ("arithmetic", "attention", "elementwise", "joins", "linear", "normalisation",
                "pooling", "reductions", "shapes", "unary", "writes")


@pytest.fixture
def restored():
    """Tests that register rules leave the registries as they found them."""
    with rules_restored():
        yield


def _resolve(spelling: str):
    owner, name = spelling.split(".")
    return getattr({"torch": torch, "Tensor": Tensor, "F": F}[owner], name)


def atan_rule(tracker, func, args, kwargs):  # the example of gapa.propagation's docstring
    x = gp.arg(args, kwargs, 0, "input")
    var = tracker.var(x) / (1 + x.square()).square()
    return func(*args, **kwargs), var


def x34(seed: int = 0) -> Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(seed), dtype=DT)


class Scale(nn.Module):
    def forward(self, x):
        return 2.0 * x


# --- the registry ----------------------------------------------------------------------------


def test_no_registered_function_was_dropped():
    missing = [s for s in REGISTERED_BEFORE if _resolve(s) not in gp.RULES]
    assert not missing
    assert len(gp.MODULE_RULES_BY_NAME) >= 207  # transformers' activations and RMS norms


def test_our_rule_modules_register_each_operation_once(restored):
    """Run every rule module again on empty registries: none registers what another did."""
    before = set(gp.RULES), set(gp.MODULE_RULES), set(gp.MODULE_RULES_BY_NAME)
    for registry in (gp.RULES, gp.MODULE_RULES, gp.MODULE_RULES_BY_NAME):
        registry.clear()
    for name in RULE_MODULES:
        spec = importlib.util.find_spec(f"gapa.propagation.{name}")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert (set(gp.RULES), set(gp.MODULE_RULES), set(gp.MODULE_RULES_BY_NAME)) == before


def test_registering_a_registered_function_names_it_and_its_rule(restored):
    snapshot = dict(gp.RULES)
    with pytest.raises(ConfigurationError,
                       match=r"operation torch\.add .*gapa\.propagation\.arithmetic\._add.*override"):
        gp.rule(torch.atan, torch.add)(atan_rule)
    assert snapshot == gp.RULES  # all or nothing: torch.atan was not registered either
    gp.rule(torch.add, override=True)(atan_rule)
    assert gp.RULES[torch.add] is atan_rule


def test_registering_the_same_rule_again_is_allowed(restored):
    gp.rule(torch.atan)(atan_rule)
    gp.rule(torch.atan, Tensor.atan)(atan_rule)
    assert gp.RULES[Tensor.atan] is atan_rule


def test_module_rules_refuse_re_registration_by_class_and_by_name(restored):
    def fn(tracker, module, args, out):
        return tracker.var(args[0])

    gp.module_rule(Scale)(fn)
    with pytest.raises(ConfigurationError, match=r"module .*Scale already has .*test_rule_api"):
        gp.module_rule(Scale)(lambda tracker, module, args, out: None)
    with pytest.raises(ConfigurationError,
                       match=r"'LlamaRMSNorm' already has .*gapa\.propagation\.normalisation"):
        gp.module_rule("LlamaRMSNorm")(fn)
    gp.module_rule("LlamaRMSNorm", override=True)(fn)
    assert gp.MODULE_RULES_BY_NAME["LlamaRMSNorm"] is fn


def test_registered_rule_is_used(restored):
    gp.rule(*gp.aliases("atan"))(atan_rule)
    x = x34()
    assert_rule_exact(torch.atan, x)
    assert_rule_exact(lambda t: t.clone().atan_(), x)  # the variance is read before the write


# --- rules for one call ------------------------------------------------------------------------


class AtanHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4).double()

    def forward(self, x):
        return torch.atan(self.linear(x))


def test_a_rule_for_one_call():
    x, v = x34(), torch.ones(3, 4, dtype=DT)
    net = AtanHead()
    snapshot = (dict(gp.RULES), dict(gp.MODULE_RULES), dict(gp.MODULE_RULES_BY_NAME))
    with pytest.raises(UnsupportedOperationError, match=r"torch\.atan .*module 'AtanHead'"):
        gapa.propagate(net, x, v)
    out = gapa.propagate(net, x, v, rules={torch.atan: atan_rule})
    with torch.no_grad():
        assert torch.equal(out.mean, net(x))
    assert_rule_exact(net, x, rules={torch.atan: atan_rule})
    assert (dict(gp.RULES), dict(gp.MODULE_RULES), dict(gp.MODULE_RULES_BY_NAME)) == snapshot
    assert_rule_exact(torch.atan, x, rules={torch.atan: atan_rule})


def test_a_rule_for_one_call_overrides_the_registered_one_for_that_call_only():
    def doubled(tracker, func, args, kwargs):
        return func(*args, **kwargs), 2.0 * tracker.var(args[0])

    x, v = x34(), torch.ones(3, 4, dtype=DT)
    plain = gapa.propagate(nn.Tanh(), x, v).var
    assert torch.equal(gapa.propagate(nn.Tanh(), x, v, rules={torch.tanh: doubled}).var, 2 * v)
    assert torch.equal(gapa.propagate(nn.Tanh(), x, v).var, plain)
    with pytest.raises(AssertionError, match=r"torch\.tanh"):
        assert_rule_exact(torch.tanh, x, rules={torch.tanh: doubled})


def test_a_module_rule_for_one_call():
    x, v = x34(), torch.ones(3, 4, dtype=DT)
    assert torch.equal(gapa.propagate(Scale(), x, v).var, 4 * v)  # the rule of the product
    for key in (Scale, "Scale"):
        out = gapa.propagate(Scale(), x, v, rules={key: lambda tr, mod, args, o: 7 * tr.var(args[0])})
        assert torch.equal(out.var, 7 * v)
    assert Scale not in gp.MODULE_RULES and "Scale" not in gp.MODULE_RULES_BY_NAME


@pytest.mark.parametrize(("rules", "match"), [
    ({torch.atan: "not a rule"}, r"torch\.atan is not callable"),
    ({Tensor: atan_rule}, "torch functions or nn.Module classes"),
])
def test_bad_rules_for_one_call(rules, match):
    with pytest.raises(ConfigurationError, match=match):
        gapa.propagate(nn.Tanh(), x34(), torch.ones(3, 4, dtype=DT), rules=rules)


# --- arg and aliases ------------------------------------------------------------------------------


def test_arg_reads_positional_or_keyword_arguments():
    assert gp.arg((1, 2), {}, 1, "other") == 2
    assert gp.arg((1,), {"other": 3}, 1, "other") == 3
    assert gp.arg((1,), {}, 1, "other", 4) == 4
    for name in RULE_MODULES:  # one helper, no private copies
        module = importlib.import_module(f"gapa.propagation.{name}")
        assert getattr(module, "arg", engine.arg) is engine.arg
        assert not hasattr(module, "argument") and not hasattr(module, "_arg")


def test_dropout_reads_training_by_position_keyword_or_default():
    x = x34()
    assert_rule_exact(F.alpha_dropout, x)  # training defaults to False here
    assert_rule_exact(lambda t: F.dropout(t, 0.5, False), x)
    with pytest.raises(UnsupportedOperationError, match="training mode"):
        assert_rule_exact(F.dropout, x)


def test_aliases_gather_the_spellings_of_an_operation():
    assert gp.aliases("exp") == (torch.exp, Tensor.exp, Tensor.exp_, torch.exp_)
    assert gp.aliases("relu") == (torch.relu, Tensor.relu, Tensor.relu_, torch.relu_, F.relu)
    assert gp.aliases("gelu", "softmax") == (F.gelu, torch.softmax, Tensor.softmax, F.softmax)
    assert Tensor.__radd__ not in gp.aliases("add")
    with pytest.raises(ConfigurationError, match="no_such_op"):
        gp.aliases("no_such_op")


#: The spellings aliases() registered beyond the hand-written lists: each is exact (first order).
ADDED = [
    lambda t: torch.tanh_(t.clone()), lambda t: t.clone().tanh_(),
    lambda t: torch.sigmoid_(t.clone()), lambda t: t.clone().sigmoid_(),
    torch.selu, lambda t: torch.selu_(t.clone()), torch.celu, lambda t: torch.celu_(t.clone()),
    lambda t: F.elu_(t.clone()), lambda t: F.leaky_relu_(t.clone(), 0.1),
    lambda t: F.hardtanh_(t.clone(), -0.5, 0.5), lambda t: torch.neg_(t.clone()),
    lambda t: t.clone().neg_(), lambda t: torch.log1p_(t.clone()),
    lambda t: torch.expm1_(t.clone()), lambda t: torch.reciprocal_(t.clone()),
    lambda t: torch.erf_(t.clone()), lambda t: t.fliplr(), lambda t: t.flipud(),
]


@pytest.mark.parametrize("fn", ADDED)
def test_spellings_added_by_aliases_are_exact(fn):
    x = 0.1 + 0.8 * torch.rand(3, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    assert_rule_exact(fn, x)


# --- gapa.testing ---------------------------------------------------------------------------------


def test_assert_rule_exact_reports_the_largest_differences_and_where():
    def off(tracker, func, args, kwargs):
        out, var = atan_rule(tracker, func, args, kwargs)
        var = var.clone()
        var[1, 2] *= 1.5
        return out, var

    with pytest.raises(AssertionError, match=r"torch\.atan .*1 of 12 entries differ.*largest "
                       r"absolute difference .* at index \(1, 2\).*relative difference 0\.5 "):
        assert_rule_exact(torch.atan, x34(), rules={torch.atan: off})


def test_assert_rule_exact_checks_the_mean():
    def wrong_mean(tracker, func, args, kwargs):
        return func(*args, **kwargs) + 1, tracker.var(args[0])

    with pytest.raises(AssertionError, match="differ from the plain call"):
        assert_rule_exact(torch.atan, x34(), rules={torch.atan: wrong_mean})


def test_assert_rule_exact_on_several_inputs_and_outputs():
    a, b = x34(), x34(1)
    va = torch.full((3, 4), 0.5, dtype=DT)
    var = assert_rule_exact(torch.mul, a, b, var=[va, None])
    assert torch.equal(var, b.square() * va)
    values_var, indices_var = assert_rule_exact(
        lambda t: F.max_pool1d(t, 2, return_indices=True), a[None])
    assert values_var.shape == (1, 3, 2) and indices_var is None
    ref = jacobian_variance(lambda t: torch.split(t, [1, 3], -1), a, var=va)
    assert [r.shape for r in ref] == [(3, 1), (3, 3)] and torch.equal(ref[0], va[:, :1])


def test_assert_rule_exact_refuses_bad_variances():
    with pytest.raises(gapa.InputError, match="non-negative"):
        assert_rule_exact(torch.tanh, x34(), var=-torch.ones(3, 4, dtype=DT))
    with pytest.raises(gapa.InputError, match="2 entries for 1 arguments"):
        assert_rule_exact(torch.tanh, x34(), var=[None, None])


def test_gapa_testing_does_not_need_pytest():
    code = ("import sys; sys.modules['pytest'] = None; import gapa.testing; "
            "print(gapa.testing.__all__)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
