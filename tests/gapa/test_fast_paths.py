"""torch modules with a no-grad fast path (MultiheadAttention, TransformerEncoderLayer) before
a GAPA layer: the mean is ``model(x)`` under ``torch.no_grad`` bit for bit, in both
propagations, and the variance is the one computed with the fast paths off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gapa
import gapa.propagation.engine as engine
from gapa.reference import monte_carlo_moments


class AttentionFirst(nn.Module):
    def __init__(self, block: str):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.block = block
        if block == "attention":
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        else:
            self.attn = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                                   batch_first=True)
        self.act, self.head = nn.GELU(), nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        if self.block == "attention":
            h = h + self.attn(h, h, h, need_weights=False)[0]
        else:
            h = self.attn(h)
        return self.head(self.act(h)).mean(1)


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
@pytest.mark.parametrize("block", ["attention", "encoder_layer"])
def test_fast_path_modules_before_the_gapa_layer_keep_the_no_grad_mean(block, propagation,
                                                                       monkeypatch):
    torch.manual_seed(0)
    model = AttentionFirst(block).eval()
    x, q = torch.randn(64, 5, 4), torch.randn(8, 5, 4)
    with torch.no_grad():
        reference = model(q)
    if torch.equal(reference, model(q)):
        pytest.skip("this torch build runs the same kernel with and without gradients")
    gm = gapa.GAPA(model, layers=["act"], propagation=propagation).fit(x, progress=False)
    out = gm(q)
    assert torch.equal(out.mean, reference)
    monkeypatch.setattr(engine, "FAST_PATH_MODULES", ())  # every module tracked, no fast path
    slow = gm(q)
    assert not torch.equal(slow.mean, reference)
    torch.testing.assert_close(out.var, slow.var, rtol=1e-5, atol=0)
    assert float(out.var.min()) > 0


def test_a_fast_path_module_after_the_gapa_layer_is_tracked():
    """Uncertain inputs reach the attention: it runs tracked, its variance is propagated."""
    torch.manual_seed(0)

    class AttentionAfter(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.act = nn.Linear(4, 16), nn.Tanh()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            h = self.act(self.embed(x))
            return self.head(self.attn(h, h, h, need_weights=False)[0]).mean(1)

    model = AttentionAfter().eval()
    gm = gapa.GAPA(model, layers=["act"], propagation="jacobian").fit(torch.randn(64, 5, 4),
                                                                      progress=False)
    q = torch.randn(8, 5, 4)
    out = gm(q)
    torch.testing.assert_close(out.mean, model(q), rtol=1e-6, atol=1e-6)
    sampled = monte_carlo_moments(gm, q, 4000, generator=torch.Generator().manual_seed(0))
    assert 0.7 < float((out.var / sampled.var).median()) < 1.4
