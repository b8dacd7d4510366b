"""GPT-2 and Llama (SmolLM2's configuration, shrunk) from ``transformers`` under the propagation
engine, on both attention code paths ("sdpa": the fused function; "eager": matmul, softmax,
matmul written out).

Random-init small models only (no downloads). The weights are drawn with std 0.2 rather than
the configs' 0.02, so that attention and MLP, not the residual stream, carry most of the output
variance and the comparisons below test them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2Block  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaDecoderLayer,
    LlamaRotaryEmbedding,
)

import gapa  # noqa: E402
from gapa.propagation import propagate  # noqa: E402
from gapa.reference import monte_carlo_propagate  # noqa: E402

DT = torch.float64


def gpt2_config(impl: str) -> GPT2Config:
    return GPT2Config(
        n_embd=32, n_head=4, n_layer=2, vocab_size=100, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, bos_token_id=0, eos_token_id=0,
        attn_implementation=impl,
    )


def llama_config(impl: str) -> LlamaConfig:
    """SmolLM2-135M's choices (silu, rms_norm_eps 1e-5, tied embeddings, 3 query heads per key
    head, rope_theta 1e5) at a small width: hidden 48, 6 heads / 2 key-value heads, 2 layers."""
    return LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=100000.0, vocab_size=100, max_position_embeddings=64, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0, attn_implementation=impl,
    )


def reinit(module: nn.Module, seed: int = 0) -> nn.Module:
    """Matrices ~ N(0, 0.2^2) (a bare block does not run the model's own initialisation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module.to(DT).eval()


def causal_mask(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf"), dtype=DT).triu(1)[None, None]


class GPT2BlockWithMask(nn.Module):
    def __init__(self, impl: str, masked: bool, upcast: bool = False):
        super().__init__()
        config = gpt2_config(impl)
        config.reorder_and_upcast_attn = upcast  # eager only: baddbmm in float32, then .type()
        self.block = GPT2Block(config, layer_idx=0)
        self.masked = masked

    def forward(self, h):
        mask = causal_mask(h.shape[1]) if self.masked else None
        return self.block(h, attention_mask=mask)


class LlamaLayer(nn.Module):
    """One decoder layer with its rotary embedding; an explicit additive causal mask, or none
    (then sdpa is causal by itself and, with grouped key-value heads, uses ``enable_gqa``)."""

    def __init__(self, impl: str, masked: bool):
        super().__init__()
        config = llama_config(impl)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.rope = LlamaRotaryEmbedding(config)
        self.masked = masked

    def forward(self, h):
        positions = torch.arange(h.shape[1])[None].expand(h.shape[0], -1)
        mask = causal_mask(h.shape[1]) if self.masked else None
        return self.layer(h, attention_mask=mask, position_embeddings=self.rope(h, positions))


def block_moments(block: nn.Module, width: int, n_mc: int = 1200):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 6, width, generator=g, dtype=DT)
    v = 1e-4 * (0.5 + torch.rand(h.shape, generator=g, dtype=DT))
    moments = propagate(block, h, v)
    with torch.no_grad():
        assert torch.equal(moments.mean, block(h))
    mc = monte_carlo_propagate(block, h, v, n_mc, generator=g, chunk=n_mc // 4)
    return moments, mc


def assert_loosely_like_monte_carlo(var: torch.Tensor, mc_var: torch.Tensor) -> None:
    """Whole-block diagonal propagation is approximate: layer norm, attention and the MLP mix the
    hidden units, and every rule after the first mixing treats correlated units as independent
    (and queries, keys and values, all computed from the same hidden states, as independent).
    Measured ratios (propagated / Monte Carlo) on these blocks: median 1.1 to 1.25, extremes 0.29
    and 4.6. The bounds are loose on purpose; a broken rule (a lost term, a wrong scale, an
    unpropagated branch) lands outside them."""
    ratio = var / mc_var
    assert bool(torch.isfinite(ratio).all())
    assert 0.6 < float(ratio.median()) < 1.7, float(ratio.median())
    assert float(ratio.min()) > 0.1 and float(ratio.max()) < 10.0, (ratio.min(), ratio.max())


@pytest.mark.parametrize(("impl", "upcast"), [("sdpa", False), ("eager", False), ("eager", True)])
def test_gpt2_block(impl, upcast):
    # (no mask with upcast: a float64 mask would lift the float32 scores, which GPT-2 refuses)
    block = reinit(GPT2BlockWithMask(impl, masked=impl == "eager" and not upcast, upcast=upcast))
    moments, mc = block_moments(block, 32)
    assert_loosely_like_monte_carlo(moments.var, mc.var)


@pytest.mark.parametrize(("impl", "masked"), [("sdpa", False), ("sdpa", True), ("eager", True)])
def test_llama_decoder_layer(impl, masked):
    """sdpa without a mask runs grouped-query attention in the fused function (enable_gqa); with
    a mask transformers repeats the key-value heads first; eager writes everything out."""
    layer = reinit(LlamaLayer(impl, masked))
    moments, mc = block_moments(layer, 48)
    assert_loosely_like_monte_carlo(moments.var, mc.var)


@pytest.mark.parametrize(("make", "width"), [
    (lambda impl: GPT2BlockWithMask(impl, masked=True), 32),
    (lambda impl: LlamaLayer(impl, masked=True), 48),
])
def test_sdpa_is_at_least_as_close_to_monte_carlo_as_eager(make, width):
    """With the same mask the fused and the written-out attention are the same function. The
    sdpa rule treats attention as a whole (values centred on the output, keys per query), which
    the eager path's separate softmax and products cannot: its variance is nearer Monte Carlo."""
    fused, eager = reinit(make("sdpa")), reinit(make("eager"))
    a, mc = block_moments(fused, width)
    b, _ = block_moments(eager, width)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-6)
    err_fused = float((a.var / mc.var - 1).abs().median())
    err_eager = float((b.var / mc.var - 1).abs().median())
    assert err_fused <= err_eager + 0.02, (err_fused, err_eager)


class FromEmbeddings(nn.Module):
    """A causal LM fed with (uncertain) input embeddings rather than token ids."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, embeddings):
        return self.model(inputs_embeds=embeddings).logits


@pytest.mark.parametrize(("impl", "dtype"), [
    ("sdpa", DT), ("eager", DT), ("sdpa", torch.float32),
])
@pytest.mark.parametrize(("cls", "config", "layer"), [
    (GPT2LMHeadModel, gpt2_config, "transformer.h.0.mlp.act"),
    (LlamaForCausalLM, llama_config, "model.layers.0.mlp.act_fn"),
])
def test_causal_lm_with_gapa_on_an_inner_activation(cls, config, layer, impl, dtype):
    torch.manual_seed(0)
    model = cls(config(impl)).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (12, 8), generator=g)
    gm = gapa.GAPA(model, [layer], m=None).fit(ids, progress=False)
    query = torch.randint(0, 100, (3, 8), generator=g)
    out = gm(query)
    with torch.no_grad():
        logits = model(query).logits
    assert torch.equal(out.mean, logits)
    assert out.var.shape == logits.shape
    assert bool(torch.isfinite(out.var).all()) and bool((out.var >= 0).all())
    assert float(out.var.max()) > 0
    # the whole model also propagates uncertain input embeddings
    embeddings = model.get_input_embeddings()(query).detach()
    wrapped = FromEmbeddings(model)
    moments = propagate(wrapped, embeddings, torch.full_like(embeddings, 1e-4))
    with torch.no_grad():
        assert torch.equal(moments.mean, wrapped(embeddings))
    assert bool(torch.isfinite(moments.var).all()) and bool((moments.var > 0).all())


@pytest.mark.parametrize(("cls", "config", "layers"), [
    (GPT2LMHeadModel, gpt2_config, ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]),
    (LlamaForCausalLM, llama_config, ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]),
])
def test_two_gapa_layers_on_transformers_activation_modules(cls, config, layers):
    """The second layer's input is uncertain, so its activation rule runs on it: it must not
    call the module again (its hooks, GAPA's among them, fire once per real call)."""
    torch.manual_seed(0)
    model = cls(config("sdpa")).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    gm = gapa.GAPA(model, layers, m=None).fit(torch.randint(0, 100, (12, 8), generator=g),
                                               progress=False)
    query = torch.randint(0, 100, (3, 8), generator=g)
    calls = []
    handle = model.get_submodule(layers[1]).register_forward_hook(lambda *a: calls.append(1))
    try:
        out = gm(query)
    finally:
        handle.remove()
    assert calls == [1]
    with torch.no_grad():
        assert torch.equal(out.mean, model(query).logits)
    assert bool(torch.isfinite(out.var).all()) and float(out.var.min()) > 0


def test_token_ids_of_any_length_at_fit_and_predict():
    """A position's units are the GP query whatever the sequence length: ids of other lengths
    are scored (the mean still the model's, bit for bit); only whole-input queries need the
    fit's length, and their error speaks of token ids, not features."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("sdpa")).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 100, (6, n), generator=g) for n in (8, 5)]  # mixed lengths
    gm = gapa.GAPA(model, ["model.layers.0.mlp.act_fn"], m=None).fit(batches, progress=False)
    for n in (3, 11):
        query = torch.randint(0, 100, (2, n), generator=g)
        out = gm(query)
        with torch.no_grad():
            assert torch.equal(out.mean, model(query).logits)
        assert bool(torch.isfinite(out.var).all()) and float(out.var.min()) > 0
    with pytest.raises(gapa.InputError, match=r"token ids of shape \(2,\) .* rank"):
        gm(torch.randint(0, 100, (2,), generator=g))
    whole = gapa.GAPA(model, ["model.layers.0.mlp.act_fn"], m=None, queries="per_input")
    whole.fit(batches[0], progress=False)
    with pytest.raises(gapa.InputError, match=r"token ids of shape \(2, 5\) .*per_input"):
        whole(torch.randint(0, 100, (2, 5), generator=g))


def test_the_jacobian_propagation_is_refused_for_a_vocabulary_at_every_position(monkeypatch):
    """A language model has vocabulary x length outputs per input: one backward pass each would
    run for hours, so the refusal comes before the first one, with the numbers."""
    from gapa.propagation import jacobian

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("sdpa")).to(DT).eval()
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(1))
    gm = gapa.GAPA(model, ["model.layers.1.mlp.act_fn"], m=None, propagation="jacobian")
    gm.fit(ids)
    monkeypatch.setattr(jacobian, "MAX_JACOBIAN_OUTPUTS", 799)
    with pytest.raises(gapa.UnsupportedOperationError, match=r"800 per input .*\(4, 8, 100\)"):
        gm(ids)
    monkeypatch.setattr(jacobian, "MAX_JACOBIAN_OUTPUTS", 800)
    assert gm(ids).var.shape == (4, 8, 100)
