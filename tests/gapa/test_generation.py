"""Greedy generation through the key-value cache against one pass over the whole sequence.

The cache carries the variances of past keys and values beside their means, so every step's
logit variance must be the one-pass variance of the same position, with left padding too, and
the tokens must be the network's own greedy choice.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_named_inputs import padded, sequences  # noqa: E402
from test_transformers_models import DT, gpt2_config, llama_config  # noqa: E402
from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: E402

import gapa  # noqa: E402


@pytest.mark.parametrize(("cls", "config", "layer"), [
    (LlamaForCausalLM, llama_config, "model.layers.0.mlp.act_fn"),
    (GPT2LMHeadModel, gpt2_config, "transformer.h.0.mlp.act"),
])
def test_each_step_scores_as_one_pass_over_the_sequence(cls, config, layer):
    torch.manual_seed(0)
    model = cls(config("sdpa")).to(DT).eval()
    gm = gapa.GAPA(model, [layer], m=None).fit([padded(sequences(1, [8, 5, 7]))])
    prompt = padded(sequences(2, [3, 5]))  # right-padded: move the padding left
    ids = torch.stack([torch.roll(r, int((m == 0).sum())) for r, m in
                       zip(prompt["input_ids"], prompt["attention_mask"], strict=True)])
    mask = torch.stack([torch.roll(m, int((m == 0).sum())) for m in prompt["attention_mask"]])
    gen = gm.generate(ids, mask, max_new_tokens=4)
    assert gen.tokens.shape == (2, 4) and gen.logits.var.shape == (2, 4, 100)
    full_ids = torch.cat([ids, gen.tokens], 1)
    full_mask = torch.cat([mask, torch.ones_like(gen.tokens)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    one = gm({"input_ids": full_ids, "attention_mask": full_mask, "position_ids": positions})
    steps = slice(ids.shape[1] - 1, full_ids.shape[1] - 1)  # the positions that predicted them
    torch.testing.assert_close(gen.logits.mean, one.mean[:, steps], rtol=0, atol=1e-10)
    torch.testing.assert_close(gen.logits.var, one.var[:, steps], rtol=1e-9, atol=0)
    assert torch.equal(gen.tokens, one.mean[:, steps].argmax(-1))


def test_the_jacobian_propagation_is_refused_for_generation():
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("sdpa")).to(DT).eval()
    gm = gapa.GAPA(model, ["model.layers.0.mlp.act_fn"], m=None, propagation="jacobian")
    gm.fit([padded(sequences(1, [6]))])
    with pytest.raises(gapa.ConfigurationError, match="diagonal"):
        gm.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
    gm.propagation = "diagonal"
    with pytest.raises(gapa.ConfigurationError, match="max_new_tokens"):
        gm.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=0)
