"""The public propagation API: ``gapa.propagate``'s input checks, module rules and keyword
inputs, ``layers="auto"`` on each architecture, and ``GAPA.trace`` against Monte Carlo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gapa
from gapa.propagation import module_rule
from gapa.propagation.engine import MODULE_RULES
from gapa.reference import monte_carlo_trace
from gapa.testing import rules_restored
from gapa_bench.architectures import SmallResNet
from helpers import TOL, mlp

DT = torch.float64


@pytest.mark.parametrize(
    ("mean", "var", "match"),
    [
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), "only floating inputs"),
        (torch.zeros(2, 3), torch.zeros(2, 4), r"\(2, 3\).*\(2, 4\)"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=DT), "float64"),
        (torch.zeros(2, 3), -torch.ones(2, 3), "non-negative"),
        (torch.zeros(2, 3), torch.full((2, 3), float("nan")), "finite"),
    ],
    ids=["integer", "shape", "dtype", "negative", "nan"],
)
def test_propagate_refuses_bad_input(mean, var, match):
    with pytest.raises(gapa.InputError, match=match):
        gapa.propagate(mlp([3, 4, 1]), mean, var)


def test_propagate_one_linear_map_is_exact(gen):
    """diag(W diag(v) W^T) = (W * W) v: exact for one linear map (composing two mixing maps is
    not, since the first correlates the units the second sums; see the trace test below)."""
    net = nn.Sequential(nn.Linear(3, 5)).double().eval()
    x = torch.randn(4, 3, generator=gen, dtype=DT)
    v = torch.rand(4, 3, generator=gen, dtype=DT)
    out = gapa.propagate(net, x, v)
    with torch.no_grad():
        assert torch.equal(out.mean, net(x))
    jac = net[0].weight
    want = torch.stack([torch.diagonal(jac @ torch.diag(vi) @ jac.T) for vi in v])
    torch.testing.assert_close(out.var, want, rtol=1e-12, atol=0)


class Scale(nn.Module):
    def forward(self, x):
        return 2.0 * x


class CallsByKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Scale()

    def forward(self, x):
        return self.inner(x=x)


def test_module_rule_replaces_the_composed_rules_and_refuses_keyword_inputs(monkeypatch, gen):
    monkeypatch.setitem(MODULE_RULES, Scale, lambda tr, mod, args, out: 7.0 * tr.var(args[0]))
    x = torch.randn(3, 2, generator=gen, dtype=DT)
    v = torch.ones_like(x)
    out = gapa.propagate(Scale(), x, v)
    assert torch.equal(out.var, 7.0 * v)  # the module rule, not the multiplication rule (4 v)
    with pytest.raises(gapa.UnsupportedOperationError, match=r"inner.*keyword"):
        gapa.propagate(CallsByKeyword(), x, v)


def test_module_rule_registers_by_name():
    with rules_restored():
        @module_rule("NoSuchModuleAnywhere")
        def fn(tr, mod, args, out):
            return tr.var(args[0])

        assert "NoSuchModuleAnywhere" in set(gapa.propagation.supported_operations())
    assert "NoSuchModuleAnywhere" not in set(gapa.propagation.supported_operations())


def test_auto_layer_is_the_activation_feeding_the_head():
    assert gapa.GAPA(mlp([3, 8, 8, 1])).layers == ["3"]
    assert gapa.GAPA(SmallResNet()).layers == ["stages.2.1.relu2"]


def test_auto_layer_on_transformers_models():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_head=2, n_layer=2, vocab_size=50, n_positions=16))
    assert gapa.GAPA(gpt2).layers == ["transformer.h.1.mlp.act"]
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=2, vocab_size=50))
    assert gapa.GAPA(llama).layers == ["model.layers.1.mlp.act_fn"]


def test_trace_matches_monte_carlo_until_correlated_units_are_summed(gen):
    """Per-module moments: diagonal propagation is exact (first order) through the GAPA layer,
    the next Linear and its activation; the last Linear sums units the previous Linear made
    correlated, which is where the diagonal rule departs from Monte Carlo (RQ5)."""
    net = mlp([3, 12, 12, 1]).double()
    x = torch.randn(200, 3, generator=gen, dtype=DT)
    q = torch.randn(5, 3, generator=gen, dtype=DT)
    gm = gapa.GAPA(net, ["1"], hyperparameters={"1": {"amplitude": 1e-4}}).fit(x, progress=False)
    closed = gm.trace(q)
    mc = monte_carlo_trace(gm, q, 10_000, generator=gen)
    assert list(closed) == ["0", "1", "2", "3", "4", ""]
    assert set(mc) == set(closed)
    assert torch.equal(closed[""].var, gm(q).var) and torch.equal(closed["4"].mean, closed[""].mean)
    assert not closed["0"].var.any()  # before the GAPA layer nothing is uncertain
    for key in ("1", "2", "3"):
        torch.testing.assert_close(closed[key].var, mc[key].var, rtol=TOL["mc_relative"], atol=0)
    ratio = closed["4"].var / mc["4"].var
    assert not torch.allclose(ratio, torch.ones_like(ratio), rtol=TOL["mc_relative"])
