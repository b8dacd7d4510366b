"""Real text batches: named inputs (a dict, a tokenizer's BatchEncoding), ``attention_mask``,
sequences of any length, a DataLoader of dicts at fit.

A padded position is not a token: the fit leaves it out of the cache and the prediction gives
it no variance. With right padding and causal attention the real positions of a padded
sequence compute exactly what the sequence alone computes, so their variance must match it.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")

from test_transformers_models import DT, llama_config  # noqa: E402
from transformers import BatchEncoding, LlamaForCausalLM  # noqa: E402

import gapa  # noqa: E402
from gapa.capture.store import ActivationStore  # noqa: E402

LAYER = "model.layers.0.mlp.act_fn"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config("sdpa")).to(DT).eval()


def padded(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-padded ids (pad id 0) and their attention mask."""
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def sequences(seed: int, lengths) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 100, (n,), generator=g) for n in lengths]


@pytest.fixture(scope="module")
def fitted(model):
    train = sequences(1, [8, 5, 7, 3, 8, 6])
    loader = DataLoader([padded(train[i : i + 2]) for i in range(0, 6, 2)], batch_size=None)
    return gapa.GAPA(model, [LAYER], m=None).fit(loader), train


def test_padded_positions_are_left_out_of_the_cache(model, fitted):
    gm, train = fitted
    alone = gapa.GAPA(model, [LAYER], m=None).fit([s[None] for s in train])
    assert gm.sites[LAYER].cache_size == sum(len(s) for s in train)  # 37 tokens, no padding
    torch.testing.assert_close(gm.sites[LAYER].rows, alone.sites[LAYER].rows, rtol=0, atol=1e-12)


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
def test_real_positions_score_as_the_sequences_alone_and_padding_gets_none(model, fitted,
                                                                          propagation):
    gm, _ = fitted
    gm.propagation = propagation
    queries = sequences(2, [6, 4])
    batch = padded(queries)
    out = gm(batch)
    with torch.no_grad():
        assert torch.equal(out.mean, model(**batch).logits)
    for i, s in enumerate(queries):
        alone = gm(s[None])
        torch.testing.assert_close(out.var[i, : len(s)], alone.var[0], rtol=1e-9, atol=0)
    assert float(out.var[1, 4:].abs().max()) == 0.0  # the two padded positions
    assert torch.equal(gm(**batch).var, out.var)
    assert torch.equal(gm(BatchEncoding(batch)).var, out.var)
    gm.propagation = "diagonal"


def test_named_inputs_that_cannot_be_right_are_refused(model, fitted):
    gm, _ = fitted
    batch = padded(sequences(3, [4, 2]))
    with pytest.raises(gapa.InputError, match=r"attention_mask of shape \(2, 3\)"):
        gm({**batch, "attention_mask": batch["attention_mask"][:, :3]})
    with pytest.raises(gapa.InputError, match=r"0 and 1"):
        gm({**batch, "attention_mask": 2 * batch["attention_mask"]})
    with pytest.raises(gapa.InputError, match="not both"):
        gm(batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(gapa.InputError, match="hold no tensor"):
        gm({"labels": None})
    whole = gapa.GAPA(model, [LAYER], m=None, queries="per_input")
    with pytest.raises(gapa.InputError, match="per_input"):
        whole.fit([padded(sequences(4, [4, 4]))])


class Interrupted(Exception):
    pass


def test_a_fit_into_a_store_takes_named_inputs_and_resumes(model, fitted, tmp_path):
    """store= caches what memory caches (padding left out); a resumed capture hashes the
    finished shards' named inputs instead of running them, and refuses another mask."""
    gm, train = fitted
    batches = [padded(train[i : i + 2]) for i in range(0, 6, 2)]
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))

    def store():
        return ActivationStore(tmp_path / "store", shard_rows=8)

    def interrupted():
        yield from batches[:2]
        raise Interrupted

    try:
        with pytest.raises(Interrupted):
            gapa.GAPA(model, [LAYER], m=None).fit(interrupted(), store=store(), progress=False)
        calls.clear()
        resumed = gapa.GAPA(model, [LAYER], m=None).fit(batches, store=store(), progress=False)
    finally:
        hook.remove()
    assert len(calls) == 1  # the two finished batches were hashed, not run
    # the store holds float32 (its default)
    assert torch.equal(resumed.sites[LAYER].rows, gm.sites[LAYER].rows.float().to(DT))
    other = [dict(b) for b in batches]
    other[0] = {**other[0], "attention_mask": other[0]["attention_mask"].flip(1)}
    with pytest.raises(gapa.errors.StoreMismatchError, match="shard 0"):
        gapa.GAPA(model, [LAYER], m=None).fit(other, store=store(), progress=False)


def test_layer_scores_read_the_gapa_layer_itself(model, fitted):
    """The GP variance at the layer over the prior amplitude, averaged over units: per token,
    0 at padding, the same for a real position padded or alone, and it is what site_variance
    says; the head never runs."""
    gm, train = fitted
    batch = padded(sequences(5, [6, 3]))
    scores = gm.layer_scores(batch)[LAYER]
    assert scores.shape == (2, 6)
    assert float(scores[1, 3:].abs().max()) == 0.0
    assert bool(((scores[0] > 0) & (scores[0] <= 1)).all())
    alone = gm.layer_scores(batch["input_ids"][1:, :3])[LAYER]
    torch.testing.assert_close(scores[1, :3], alone[0], rtol=1e-9, atol=0)
    z = gm.pre_activations(batch["input_ids"][:1])[LAYER]  # (6, units) rows of sequence 0
    amplitude = gm.sites[LAYER].hyperparameters.amplitude
    expected = (gm.site_variance(LAYER, z) / amplitude).mean(-1)
    torch.testing.assert_close(scores[0], expected, rtol=1e-12, atol=0)
    # a training token sits at its own cached activation: near 0; random ids score higher
    seen = gm.layer_scores(train[0][None])[LAYER]
    assert float(seen.max()) < 0.05 < float(scores[0].mean())
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        gm.layer_scores(batch)
    finally:
        handle.remove()
    assert calls == []


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
def test_scored_is_the_moments_and_the_layer_scores_of_one_pass(model, fitted, propagation):
    """``gm.scored`` gives exactly ``gm(x)`` and ``gm.layer_scores(x)``; the head runs once."""
    gm, _ = fitted
    batch = padded(sequences(7, [6, 4]))
    gm.propagation = propagation
    try:
        calls = []
        handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
        try:
            out, scores = gm.scored(batch)
        finally:
            handle.remove()
        want = gm(**batch)
        assert torch.equal(out.mean, want.mean) and torch.equal(out.var, want.var)
        expected = gm.layer_scores(batch)
        assert scores.keys() == expected.keys()
        assert all(torch.equal(scores[k], expected[k]) for k in scores)
        assert len(calls) == 1  # the head runs once (layer scores stop before it)
    finally:
        gm.propagation = "diagonal"


def test_next_token_calibration_scores_shifted_labels_and_skips_ignored_and_padding(fitted):
    """Position t predicts label t + 1; -100 labels and padded targets are left out. The fitted
    scale is the one fit_variance_scale gives on exactly those positions."""
    from gapa.predictive.classification import fit_variance_scale

    gm, _ = fitted
    batch = padded(sequences(6, [7, 5, 6]))
    labels = batch["input_ids"].clone()
    labels[0, 3] = -100
    fit = gm.calibrate_classifier(batch, labels, next_token=True, lengthscale_factors=None)
    out = gm(batch)
    keep = (labels[:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
    assert int(keep.sum()) == 6 + 4 + 5 - 1
    expected = fit_variance_scale(out.mean[:, :-1][keep], out.var[:, :-1][keep],
                                  labels[:, 1:][keep])
    assert fit.scale == expected.scale and fit.nll == expected.nll
    pred = gm.classify(batch)  # next-token probabilities: the network's top token every time
    assert pred.probs.shape == out.mean.shape
    assert torch.equal(pred.probs.argmax(-1), out.mean.argmax(-1))
    assert pred.total_logit_variance.shape == (3, 7)
    with pytest.raises(gapa.InputError, match="no position is left"):
        gm.calibrate_classifier(batch, torch.full_like(labels, -100), next_token=True)


def test_named_inputs_are_split_into_batches_with_their_mask(fitted):
    """moments() and the calibrations split named inputs row-wise, mask included."""
    gm, _ = fitted
    batch = padded(sequences(7, [7, 5, 6, 3, 7]))
    whole = gm.moments(batch, batch_size=None)
    parts = gm.moments(batch, batch_size=2)  # 2 + 2 + 1 sequences
    torch.testing.assert_close(parts.var, whole.var, rtol=1e-9, atol=0)
    assert torch.equal(parts.mean.argmax(-1), whole.mean.argmax(-1))
    assert float(parts.var[3, 3:].abs().max()) == 0.0  # the fourth sequence's padding
    fits = [gm.calibrate_classifier(batch, batch["input_ids"], next_token=True, batch_size=b,
                                    lengthscale_factors=None) for b in (None, 2)]
    assert fits[1].scale == pytest.approx(fits[0].scale, rel=1e-6)
