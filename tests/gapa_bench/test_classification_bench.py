"""`gapa bench classification` end to end on a tiny real subset of Fashion-MNIST: every method
runs, records are complete (every OOD score of every method, provenance, selections), the metrics
are those of gapa_bench.metrics, GAPA never changes a decision of the network, GAPA's settings are
chosen on validation, old record files still load, and the CLI writes its JSON and figures."""

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
from gapa_bench.selection import grid

needs_fashion = pytest.mark.skipif(
    not all((FASHION_MNIST_DIR / f"{s}.gz").is_file() for s in _FILES.values()),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} "
    "(apt-get install -y dataset-fashion-mnist)",
)
TRAIN = {"epochs": 2, "batch_size": 64}
#: All-weights KFAC Laplace predicts at ~0.2 s per image whatever the data size (laplace-torch
#: forms each image's 10 x 199k Jacobian): its end-to-end run is a slow test; its own tests
#: (tests/test_laplace_classification.py) use a tiny network.
#: VaLLA with M = 200 is VaLLA with M = 100 at twice the cost: the end-to-end run takes one.
FAST_METHODS = [m for m in cb.METHODS if m not in ("lla_kfac", "valla_200")]
#: The epistemic score each method must have (None: only entropy and max-prob).
OWN_SCORES = {"map": None, "temperature": None, "lla_lastlayer": "logit_variance",
              "lla_kfac": "logit_variance", "ella": "logit_variance",
              "valla_100": "logit_variance", "valla_200": "logit_variance",
              "mc_dropout": "mutual_information", "ensemble": "mutual_information",
              "knn": "distance", "gapa": "logit_variance", "gapa_default": "logit_variance",
              "gapa_prior": "logit_variance", "gapa_ml": "logit_variance"}


@pytest.fixture(scope="module")
def tiny():
    return subset(load_fashion_mnist(), 500, 200, seed=0)


@pytest.fixture(scope="module")
def results(tiny, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GAPA_CACHE_DIR", str(cache))
        sets = cb.EvalSets(tiny.x_test, tiny.y_test, ood={"flipped": tiny.x_test.flip(-2),
                                                          "inverted": 1 - tiny.x_test},
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
    assert set(OWN_SCORES) == set(cb.METHODS)
    for rec in records:
        assert set(rec) == {"dataset", "backbone", "method", "seed", "accuracy", "nll", "ece",
                            "brier", "ood_scores", "own_score", "rotated", "fit_s", "test_s",
                            "info", "run"}
        own = OWN_SCORES[rec["method"]]
        assert rec["own_score"] == own
        assert set(rec["ood_scores"]) == {"entropy", "max_prob"} | ({own} if own else set())
        for by_set in rec["ood_scores"].values():
            assert set(by_set) == {"flipped", "inverted"}
            assert all(set(v) == {"auroc", "fpr95"} for v in by_set.values())
        assert set(rec["rotated"]) == {"0", "90"}
        assert rec["fit_s"] > 0 and rec["test_s"] > 0
        assert set(rec["run"]) == {"commit", "date", "machine", "command"}
    assert all(rec["run"] == records[0]["run"] for rec in records)  # one run, one provenance
    for rec in records:
        if rec["method"] in ("lla_lastlayer", "ella", "gapa", "gapa_default", "gapa_prior",
                             "gapa_ml"):
            assert rec["info"]["predictive"] == "argmax_preserving"
            assert rec["info"]["variance_scale"] >= 0
        if rec["method"] in ("gapa", "gapa_prior", "gapa_ml", "mc_dropout", "knn"):
            assert set(rec["info"]["selection"]) == {"criterion", "candidates", "chosen", "tried"}
        if rec["method"] == "ella":
            assert isinstance(rec["info"]["prior_precision_interior"], bool)


@needs_fashion
def test_scores_equal_the_metrics_module(results):
    out, sets, _, _ = results
    for r in out:
        rep = classification_report(r.probs, sets.y_test)
        assert (r.accuracy, r.nll, r.ece, r.brier) == tuple(rep[k] for k in
                                                               ("accuracy", "nll", "ece", "brier"))
        for score, by_set in r.ood_scores.items():
            for set_name, report in by_set.items():
                assert report == ood_report(r.scores["test"][score], r.scores[set_name][score])
        # entropy and max-prob come from the probabilities, the same way for every method
        entropy = -torch.special.xlogy(r.probs, r.probs).sum(-1)
        assert torch.equal(r.scores["test"]["entropy"], entropy)
        assert torch.equal(r.scores["test"]["max_prob"], 1 - r.probs.amax(-1))
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
def test_gapa_settings_are_chosen_on_validation_and_recorded(results):
    by_name = {r.method: r for r in results[0]}
    # without conditioning M is never read, so gapa_prior does not try it
    for name, conditioning, names in (("gapa", "local", ("m", "queries")),
                                      ("gapa_prior", "prior", ("queries",))):
        info = by_name[name].info
        sel = info["selection"]
        # the MLP's layer has no positions: one queries candidate, not two identical fits
        expected = {"m": [512, 2048], "queries": ["per_input"]}
        assert sel["candidates"] == {k: expected[k] for k in names}
        assert sel["criterion"] == "validation NLL"
        assert [{k: t[k] for k in names} for t in sel["tried"]] == grid(sel["candidates"])
        scores = [t["score"] for t in sel["tried"]]
        best = sel["tried"][scores.index(min(scores))]
        assert sel["chosen"] == {k: best[k] for k in names}
        assert all(info[k] == best[k] for k in names)
        assert info["val_nll"] == best["score"]  # the calibrated validation NLL chose
        assert info["conditioning"] == conditioning
    assert "selection" not in by_name["gapa_default"].info
    assert by_name["gapa_default"].info["m"] == 512  # the library's default, untouched
    ml = by_name["gapa_ml"].info
    assert (ml["lengthscale_rule"], ml["amplitude_rule"]) == ("marginal_likelihood",) * 2
    assert ml["selection"]["candidates"] == by_name["gapa"].info["selection"]["candidates"]


def test_queries_candidates_are_kept_for_layers_with_positions():
    from gapa_bench.classifiers import build_classifier

    x = torch.zeros(1, 1, 8, 8)
    mlp = build_classifier("mlp", 3, in_shape=(1, 8, 8)).eval()
    resnet = build_classifier("resnet", 3, in_shape=(1, 8, 8)).eval()
    assert cb.gapa_candidates(mlp, x)["queries"] == ["per_input"]
    assert cb.gapa_candidates(resnet, x) == cb.GAPA_CLASSIFIER_CANDIDATES
    assert cb.gapa_candidates(mlp, x, {"m": [4]}) == {"m": [4]}


@needs_fashion
def test_table_marks_the_best_and_the_test_time_ratio(results):
    table = cb.summary_table(results[0])
    lines = table.splitlines()
    assert len(lines) == 2 + len(FAST_METHODS)
    for header in ("flipped AUROC (entropy)", "flipped AUROC (own score)",
                   "inverted AUROC (entropy)", "rotated NLL", "rotated ECE", "fit s", "test s",
                   "Brier"):
        assert header in lines[0]
    assert "**" in table and lines[2].endswith("1.0x |")  # map's own ratio
    for r in results[0]:
        row = next(line for line in lines if line.startswith(f"| {r.method} |"))
        # the own score is the declared epistemic one (entropy for MAP), named in its cell
        assert f"({r.own_score or 'entropy'})" in row


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
    assert "| gapa |" in printed and "rotated ECE" in printed
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
    assert res.probs.shape == (20, 10) and res.own_score == "logit_variance"
    assert 0.0 <= res.ood_scores["logit_variance"]["flipped"]["auroc"] <= 1.0
    assert res.info["scale_val_rows"] == 20


#: Records as the benchmark wrote them before ``ood_scores``: ``ood`` by the own score named in
#: ``info["ood_score"]`` (entropy without one), ``ood_entropy`` beside it.
OLD_RECORDS = [
    {"dataset": "fashion-mnist", "backbone": "mlp", "method": method, "seed": seed,
     "accuracy": 0.89, "nll": 0.3, "ece": 0.02, "brier": 0.16,
     "ood": {"mnist": {"auroc": own, "fpr95": 0.5}},
     "ood_entropy": {} if entropy is None else {"mnist": {"auroc": entropy, "fpr95": 0.6}},
     "rotated": {"0": {"accuracy": 0.89, "nll": 0.3, "ece": 0.02}}, "fit_s": 1.0, "test_s": 1.0,
     "info": info}
    for seed in (0, 1)
    for method, own, entropy, info in [
        ("map", 0.85, None, {}),
        ("gapa", 0.99, 0.90, {"ood_score": "total_variance", "m": 2048}),
        ("knn", 0.95, 0.85, {"k": 50, "ood_score": "distance to neighbour 50"}),
    ]
]


def test_old_records_load(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(OLD_RECORDS))
    loaded = {r.method: r for r in cb.load_records(path)}
    assert loaded["map"].ood_scores == {"entropy": {"mnist": {"auroc": 0.85, "fpr95": 0.5}}}
    assert loaded["map"].own_score is None and loaded["map"].run is None
    assert loaded["gapa"].own_score == "logit_variance"
    assert loaded["gapa"].ood_scores == {"entropy": {"mnist": {"auroc": 0.90, "fpr95": 0.6}},
                                         "logit_variance": {"mnist": {"auroc": 0.99,
                                                                      "fpr95": 0.5}}}
    assert loaded["knn"].own_score == "distance"
    assert loaded["knn"].ood_scores["distance"]["mnist"]["auroc"] == 0.95
    assert loaded["knn"].rotated == {0: {"accuracy": 0.89, "nll": 0.3, "ece": 0.02}}
    table = cb.summary_table(cb.load_records(path))
    assert "0.990 ± 0.000 (logit_variance)" in table and "0.850 ± 0.000 (entropy)" in table
    # a score a record lacks (max-prob, before it was recorded) is left out, not invented
    assert "max_prob" not in table


def test_records_under_benchmarks_results_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[2] / "benchmarks" / "results").glob("fmnist-*.json"))
    if not files:
        pytest.skip("no classification records under benchmarks/results")
    results = cb.load_records(*files)
    assert results and all("entropy" in r.ood_scores for r in results)
    gapa = [r for r in results if r.method == "gapa"]
    assert gapa and all(r.own_score == "logit_variance" for r in gapa)
    assert cb.summary_table(results).count("\n") == 1 + len({r.method for r in results})


@needs_fashion
def test_figures_show_each_methods_own_score(results, tmp_path):
    from gapa_bench.plotting import classification_figures

    out, sets, _, _ = results
    paths = classification_figures(tmp_path, out, sets.y_test, title="(tiny)")
    assert {p.name for p in paths} == {"reliability.png", "ood_scores.png", "rotation.png"}
    assert all(p.stat().st_size > 0 for p in paths)
    assert {r.method: r.headline_score for r in out}["map"] == "entropy"
    assert {r.method: r.headline_score for r in out}["knn"] == "distance"
