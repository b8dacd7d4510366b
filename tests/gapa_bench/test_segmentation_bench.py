"""The segmentation benchmark end to end on tiny composed scenes, and its last-layer Laplace
against the explicit Jacobian formulas."""

from __future__ import annotations

import math

import pytest
import torch

import gapa_bench.segmentation_bench as sb
import gapa_bench.segmenters as sg
from gapa_bench.baselines.dropout import DROPOUT_RATES
from gapa_bench.data import scenes as sc
from helpers import item_pool

pytestmark = pytest.mark.usefixtures("one_thread")


def _jacobian(features: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The head's Jacobian per pixel in its class-major weights: ``(n, C, C * (d + 1))``."""
    return torch.stack([torch.kron(torch.eye(n_classes, dtype=torch.float64), f[None])
                        for f in features.double()])


def test_last_layer_ggn_and_logit_variance_match_the_explicit_jacobian():
    g = torch.Generator().manual_seed(0)
    n, c, d = 50, 4, 3
    probs = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    feats = sb._with_bias(torch.randn(n, d, generator=g, dtype=torch.float64))
    jac = _jacobian(feats, c)
    lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    want = torch.einsum("nap,nab,nbq->pq", jac, lam, jac)
    torch.testing.assert_close(sb.last_layer_ggn(probs, feats), want, rtol=1e-12, atol=1e-12)
    a = torch.randn(c * (d + 1), c * (d + 1), generator=g, dtype=torch.float64)
    sigma = a @ a.T + torch.eye(len(a), dtype=torch.float64)
    full = torch.diagonal(jac @ sigma @ jac.transpose(1, 2), dim1=1, dim2=2)
    torch.testing.assert_close(sb.head_logit_variance(feats, sigma, c), full, rtol=1e-12,
                               atol=1e-12)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """Scenes from synthetic blobs, small constants, a cache of its own."""
    monkeypatch.setenv("GAPA_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sg.TRAIN_SETTINGS, "epochs", 1)
    for name, value in {"SHIFT_SCENES": 3, "LAPLACE_PIXELS": 4000, "KNN_BANK": 2000, "KNN_K": 5,
                        "MC_SAMPLES": 2, "ENSEMBLE_MEMBERS": 2, "BATCH": 4}.items():
        monkeypatch.setattr(sb, name, value)
    pool, classes = item_pool(40, 0)
    strange, _ = item_pool(10, 1)

    def scenes(n, seed, **kw):
        return sc.compose(pool, classes, n, side=64, seed=seed, **kw)

    data = sc.SceneData(train=scenes(12, 1), val=scenes(6, 2), test=scenes(6, 3),
                        ood={"odd": scenes(4, 4, unknown={"odd": strange})}, side=64, seed=0)
    model, _, _ = sg.cached_segmenter(data, seed=0, progress=False)
    return model, data


def test_every_method_runs_and_keeps_or_owns_its_labels(tiny):
    """Each method gives finite per-pixel metrics, OOD scores and shift curves; the post-hoc
    methods' labels are the network's own, pixel for pixel."""
    model, data = tiny
    plain = sg.segment_logits(model, data.test.images).argmax(1)
    for name in sb.METHODS:
        res = sb.run_method(name, model, data, seed=0)
        rec = res.record()
        assert rec["kind"] == "segmentation" and rec["method"] == name
        for key in ("accuracy", "miou", "nll", "ece", "brier", "fit_s", "test_s", "batch_s"):
            assert math.isfinite(rec[key]), (name, key)
        scores = {"entropy", "max_prob"} | ({res.own_score} if res.own_score else set())
        assert set(rec["ood_scores"]) == scores, name
        assert set(rec["shift"]) == set(sc.SHIFTS)
        if name in ("temperature", "lla_lastlayer", "gapa_default"):  # post hoc, costly to refit
            probs = sb.METHODS[name](model, data, seed=0).predict(data.test.images)
            assert probs.shape == (6, 11, 64, 64)
            assert torch.equal(probs.argmax(1), plain), name
        if name not in ("mc_dropout", "ensemble"):
            assert res.miou == sb.mean_iou(plain, data.test.labels, 11), name
        if name == "gapa":
            assert res.info["selection"]["candidates"] == sb.GAPA_LAYER_CANDIDATES
        if name == "mc_dropout":  # one U-Net per declared rate, chosen on validation
            assert res.info["selection"]["candidates"] == {"p": list(DROPOUT_RATES)}
            assert res.info["p"] in DROPOUT_RATES


def test_records_make_the_report_table(tiny, tmp_path):
    from gapa_bench import report
    from gapa_bench.bench import write_records

    model, data = tiny
    results = [sb.run_method(name, model, data, seed=0) for name in ("map", "gapa_prior")]
    write_records(tmp_path / "seg.json", results)
    block = report.KINDS["segmentation"](["seg.json"], tmp_path)
    head = next(line for line in block.splitlines() if line.startswith("| method"))
    assert "mIoU" in head and "shifted NLL" in head and "batch / U-Net" in head
    assert "odd AUROC (own score)" in head
    rows = [line for line in block.splitlines() if line.startswith(("| map ", "| gapa_prior "))]
    assert len(rows) == 2 and f"{results[0].miou:.3f}" in rows[0]
    classification = report.KINDS["classification"]
    assert "mIoU" not in classification(["seg.json"], tmp_path)  # the plain classification view


def test_figures_are_drawn_from_the_results(tiny, tmp_path):
    from gapa_bench.plotting import segmentation_figures

    model, data = tiny
    first = {name: sb.run_method(name, model, data, seed=0) for name in ("map", "knn")}
    assert first["knn"].figure["score_name"] == "distance"
    assert first["knn"].figure["maps"].shape == (4, 64, 64)
    scenes = data.ood["odd"]
    shown = {"images": scenes.images[:4, 0].numpy(), "labels": scenes.labels[:4].numpy(),
             "unknown": scenes.unknown[:4].numpy(),
             "predicted": sg.segment_logits(model, scenes.images[:4]).argmax(1).numpy()}
    paths = segmentation_figures(tmp_path, first, shown)
    assert [p.name for p in paths] == ["segmentation-maps.png", "segmentation-reliability.png",
                                       "segmentation-ood.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
