"""`gapa bench classification` end to end on a tiny real subset of Fashion-MNIST: every method
runs, records are complete, the metrics are those of gapa_bench.metrics, GAPA never changes a decision
of the network, and the CLI writes its JSON and figures."""

from __future__ import annotations

import json

import pytest
import torch

from gapa.errors import ConfigurationError
from gapa_bench import classification_bench as cb
from gapa_bench.classifiers import cached_classifier
from gapa_bench.cli import main
from gapa_bench.data.images import _FILES, FASHION_MNIST_DIR, load_fashion_mnist, subset
from gapa_bench.metrics import classification_report, ood_report

needs_fashion = pytest.mark.skipif(
    not all((FASHION_MNIST_DIR / f"{s}.gz").is_file() for s in _FILES.values()),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} "
    "(apt-get install -y dataset-fashion-mnist)",
)
TRAIN = {"epochs": 2, "batch_size": 64}
#: All-weights KFAC Laplace predicts at ~0.2 s per image whatever the data size (laplace-torch
#: forms each image's 10 x 199k Jacobian): its end-to-end run is a slow test; its own tests
#: (tests/test_laplace_classification.py) use a tiny network.
FAST_METHODS = [m for m in cb.METHODS if m != "lla_kfac"]


@pytest.fixture(scope="module")
def tiny():
    return subset(load_fashion_mnist(), 500, 200, seed=0)


@pytest.fixture(scope="module")
def results(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GAPA_CACHE_DIR", str(cache))
        sets = cb.EvalSets(tiny.x_test, tiny.y_test, ood={"flipped": tiny.x_test.flip(-2)},
                           rotated={0: (tiny.x_test, tiny.y_test),
                                    90: (tiny.x_test.rot90(1, (-2, -1)), tiny.y_test)})
        out = cb.run_benchmark(tiny, "mlp", FAST_METHODS, seeds=1, sets=sets, train=TRAIN,
                               progress=False, json_path=cache / "records.json")
        backbone = cached_classifier(tiny, "mlp", seed=0, progress=False, **TRAIN)[0]
    return out, sets, backbone, cache


@needs_fashion
def test_every_method_runs_and_records_are_complete(results):
    out, _, _, cache = results
    assert [r.method for r in out] == FAST_METHODS
    records = json.loads((cache / "records.json").read_text())
    assert len(records) == len(FAST_METHODS)
    for rec in records:
        assert set(rec) >= {"dataset", "backbone", "method", "seed", "accuracy", "nll", "ece", "ood_entropy",
                            "brier", "ood", "rotated", "fit_s", "test_s", "info"}
        assert set(rec["ood"]) == {"flipped"} and set(rec["ood"]["flipped"]) == {"auroc", "fpr95"}
        assert set(rec["rotated"]) == {"0", "90"}
        assert rec["fit_s"] > 0 and rec["test_s"] > 0


@needs_fashion
def test_scores_equal_the_metrics_module(results):
    out, sets, _, _ = results
    for r in out:
        rep = classification_report(r.probs, sets.y_test)
        assert (r.accuracy, r.nll, r.ece, r.brier) == tuple(rep[k] for k in
                                                               ("accuracy", "nll", "ece", "brier"))
        assert r.ood["flipped"] == ood_report(r.scores["test"], r.scores["flipped"])
    # unrotated images score as the test set
    gapa = next(r for r in out if r.method == "gapa")
    assert gapa.rotated[0]["nll"] == pytest.approx(gapa.nll, rel=1e-12)


@needs_fashion
def test_gapa_never_changes_a_decision(results):
    out, sets, backbone, _ = results
    with torch.no_grad():
        decisions = backbone(sets.x_test).argmax(-1)
    by_name = {r.method: r for r in out}
    assert torch.equal(by_name["gapa"].probs.argmax(-1), decisions)
    assert by_name["gapa"].accuracy == by_name["map"].accuracy
    assert by_name["gapa"].info["layers"] == ["4"]  # the last tanh, feeding the head


@needs_fashion
def test_table_marks_the_best_and_the_test_time_ratio(results):
    table = cb.summary_table(results[0])
    lines = table.splitlines()
    assert len(lines) == 2 + len(FAST_METHODS)
    assert "AUROC flipped" in lines[0] and "rot. NLL" in lines[0]
    assert "**" in table and lines[2].endswith("1.00x |")  # map's own ratio


def test_unknown_methods_and_sets_raise():
    with pytest.raises(ConfigurationError, match="unknown method"):
        cb.parse_methods("map,bogus")
    assert cb.parse_methods(None) == list(cb.METHODS)
    with pytest.raises(ConfigurationError, match="unknown OOD"):
        cb.eval_sets(None, ["svhn"])


@needs_fashion
def test_cli_writes_records_and_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GAPA_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["classification", "--methods", "map,gapa", "--seeds", "1",
                 "--subset", "400", "--max-epochs", "1", "--ood", "rotated",
                 "--rotated-size", "50", "--json", str(tmp_path / "r.json"),
                 "--figures", str(tmp_path / "fig"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| gapa |" in printed and "rot. ECE" in printed
    assert len(json.loads((tmp_path / "r.json").read_text())) == 2
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {"reliability.png", "rotation.png"}


@needs_fashion
def test_records_reload_into_the_same_table(results):
    out, _, _, cache = results
    assert cb.summary_table(cb.load_records(cache / "records.json")) == cb.summary_table(out)


@needs_fashion
def test_eval_sets_subsets_for_slow_methods(tiny):
    sets = cb.eval_sets(tiny, ["mnist", "rotated"], rotated_size=30, test_size=50,
                        angles=(0, 45))
    assert sets.x_test.shape == (50, 1, 28, 28) and sets.ood["mnist"].shape == (50, 1, 28, 28)
    assert torch.bincount(sets.y_test).tolist() == [5] * 10  # class-balanced
    assert set(sets.rotated) == {0, 45} and sets.rotated[0][0].shape[0] == 30


@needs_fashion
def test_methods_that_do_not_apply_are_skipped_and_said(tiny, tmp_path, monkeypatch):
    from gapa_bench.errors import NotApplicableError

    def refuse(*_, **__):
        raise NotApplicableError("not on this backbone")

    monkeypatch.setenv("GAPA_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(cb.METHODS, "refuses", refuse)
    said = []
    sets = cb.EvalSets(tiny.x_test[:20], tiny.y_test[:20])
    out = cb.run_benchmark(tiny, "mlp", ["refuses", "map"], seeds=1, sets=sets, train=TRAIN,
                           progress=False, log=said.append)
    assert [r.method for r in out] == ["map"]
    assert said == ["refuses: skipped (not on this backbone)"]


@needs_fashion
@pytest.mark.slow
def test_all_weights_kfac_runs_end_to_end(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("GAPA_CACHE_DIR", str(tmp_path))
    small = subset(tiny, 200, 20, n_val=20)
    sets = cb.EvalSets(small.x_test, small.y_test, ood={"flipped": small.x_test.flip(-2)})
    (res,) = cb.run_benchmark(small, "mlp", ["lla_kfac"], seeds=1, sets=sets, train=TRAIN,
                              progress=False)
    assert res.probs.shape == (20, 10) and 0.0 <= res.ood["flipped"]["auroc"] <= 1.0
