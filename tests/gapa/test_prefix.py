"""The lengthscale search replays what runs before the first GAPA layer instead of recomputing
it per factor: the calibration must be exactly the one without the replay, the prefix must run
once per batch, and another thread's forward pass must compute as usual meanwhile."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from torch import nn

import gapa
import gapa.core


class CountingLinear(nn.Linear):
    """A Linear that counts how often its own forward runs."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(CountingLinear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 1)).double().eval()


@contextlib.contextmanager
def no_replay():
    @contextlib.contextmanager
    def plain(model, layers):
        yield lambda key, fn: fn()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gapa.core, "replaying_prefix", plain)
        yield


@pytest.mark.parametrize("method", ["calibrate", "calibrate_classifier"])
def test_the_replayed_search_is_the_search(method):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    xv = 2 * torch.randn(90, 3, generator=gen, dtype=torch.float64)
    net = model()
    if method == "calibrate":
        y = torch.sin(xv.sum(1, keepdim=True))
        call = lambda gm: gm.calibrate(xv, y)  # noqa: E731
    else:
        net[4] = nn.Linear(16, 4).double()
        labels = (xv[:, 0] > 0).long() + 2 * (xv[:, 1] > 0).long()
        call = lambda gm: gm.calibrate_classifier(xv, labels, batch_size=40)  # noqa: E731
    fitted = [gapa.GAPA(net, ["3"], m=None).fit(x) for _ in range(2)]
    CountingLinear.calls = 0
    with no_replay():
        plain = call(fitted[0])
    calls_plain, CountingLinear.calls = CountingLinear.calls, 0
    replayed = call(fitted[1])
    calls_replayed = CountingLinear.calls
    assert replayed == plain
    assert fitted[1].lengthscale_factor == fitted[0].lengthscale_factor
    assert torch.equal(fitted[1](xv).var, fitted[0](xv).var)
    batches = 1 if method == "calibrate" else 3
    factors = len(gapa.core.LENGTHSCALE_FACTORS)
    assert calls_plain == factors * batches and calls_replayed == batches
    assert "forward" not in net[0].__dict__  # the patch is gone


def test_another_thread_computes_while_the_prefix_is_replayed():
    net = model()
    x = torch.randn(200, 3, dtype=torch.float64)
    gm = gapa.GAPA(net, ["3"], m=None).fit(x)
    other = torch.randn(7, 3, dtype=torch.float64)
    with torch.no_grad():
        expected = net(other)
    seen = []

    def plain_forward():  # another thread, while net[0] is patched in the main thread
        with torch.no_grad():
            seen.append(torch.equal(net(other), expected))

    def during(module, args, out):
        if "forward" in net[0].__dict__ and threading.current_thread() is threading.main_thread():
            t = threading.Thread(target=plain_forward)
            t.start()
            t.join()

    handle = net[2].register_forward_hook(during)
    try:
        gm.calibrate(torch.randn(50, 3, dtype=torch.float64),
                     torch.randn(50, 1, dtype=torch.float64))
    finally:
        handle.remove()
    assert len(seen) == len(gapa.core.LENGTHSCALE_FACTORS) - 1 and all(seen)


def test_a_language_model_calibrates_the_same_with_its_first_block_replayed():
    pytest.importorskip("transformers")
    from test_named_inputs import padded, sequences
    from test_transformers_models import DT, llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(llama_config("sdpa")).to(DT).eval()
    layer = "model.layers.1.mlp.act_fn"  # block 0, the embeddings and the rotary table replay
    fitted = [gapa.GAPA(lm, [layer], m=None).fit([padded(sequences(1, [8, 6, 7]))])
              for _ in range(2)]
    batch = padded(sequences(2, [7, 5, 6]))
    with no_replay():
        plain = fitted[0].calibrate_classifier(batch, batch["input_ids"], next_token=True)
    calls = []
    handle = lm.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        replayed = fitted[1].calibrate_classifier(batch, batch["input_ids"], next_token=True)
    finally:
        handle.remove()
    assert replayed == plain
    assert calls == [1]  # block 0's MLP ran once (the record), not once per factor
