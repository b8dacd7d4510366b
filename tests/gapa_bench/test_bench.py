"""The regression benchmark harness end to end on a tiny data set: every method runs, records
are complete, metrics equal the metrics module's, the table and the CLI work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gapa.errors import ConfigurationError, MissingDependencyError
from gapa_bench import bench, metrics
from gapa_bench.backbones import cached_regressor
from gapa_bench.cli import main
from gapa_bench.data import from_arrays, load_dataset
from gapa_bench.errors import DataError
from gapa_bench.regression import RECORD_FIELDS

TRAIN = {"width": 16, "depth": 3, "max_epochs": 3}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("GAPA_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * rng.normal(size=400)
    return from_arrays(x, y, name="tiny", feature_names=["a", "b", "c"], sizes=(240, 80, 80),
                       split="rows")


def test_every_method_runs_and_scores_like_the_metrics_module(tiny, tmp_path):
    out = tmp_path / "records.json"
    results = bench.run_benchmark(tiny, list(bench.METHODS), seeds=2, train=TRAIN,
                                  progress=False, json_path=out)
    assert [(r.method, r.seed) for r in results] == [
        (m, s) for m in bench.METHODS for s in range(2)
    ]
    y = tiny.y_test * tiny.y_std + tiny.y_mean
    for r in results:
        assert r.nll == metrics.gaussian_nll(r.mean, r.std, y)
        assert r.crps == metrics.crps_gaussian(r.mean, r.std, y)
        assert r.cqm == metrics.cqm(r.mean, r.std, y)
        assert r.rmse == metrics.rmse(r.mean, y)
        assert r.fit_s > 0 and r.test_s > 0 and r.peak_rss_mib > 0
        assert r.scale >= 0 and r.noise > 0
    records = json.loads(out.read_text())
    assert len(records) == len(results)
    for rec in records:
        assert list(rec)[: len(RECORD_FIELDS)] == list(RECORD_FIELDS)
        assert rec["dataset"] == "tiny" and rec["split"] == "rows"
        assert all(np.isfinite(rec[k]) for k in RECORD_FIELDS[3:])
        assert set(rec["run"]) == {"commit", "date", "machine", "command"}
        assert rec["run"]["machine"]["cores"] >= 1
    # every method with settings to choose chose them on validation, from the declared set
    chosen = {rec["method"]: rec["info"]["selection"] for rec in records
              if "selection" in rec["info"]}
    assert set(chosen) == {"mc_dropout", "gapa", "gapa_prior", "gapa_random"}
    assert chosen["gapa"]["candidates"] == bench.GAPA_CANDIDATES
    assert chosen["mc_dropout"]["candidates"] == {"p": list(bench.DROPOUT_RATES)}
    for sel in chosen.values():
        best = min(sel["tried"], key=lambda t: t["score"])
        assert sel["chosen"] == {k: best[k] for k in sel["candidates"]}
    # the record's validation NLL is the criterion the selection read
    for rec in records:
        if "selection" in rec["info"]:
            best = min(t["score"] for t in rec["info"]["selection"]["tried"])
            assert rec["val_nll"] == pytest.approx(best, rel=1e-12)
    gapa = next(rec for rec in records if rec["method"] == "gapa")
    assert [gapa["info"][k] for k in ("layers", "m")] == [gapa["info"]["selection"]["chosen"][k]
                                                          for k in ("layers", "m")]
    assert gapa["info"]["lengthscale_factors"] == sorted(bench.LENGTHSCALE_CANDIDATES)


def test_post_hoc_methods_keep_the_backbone_mean(tiny):
    results = bench.run_benchmark(tiny, ["map", "gapa", "gapa_prior", "gapa_random", "ella",
                                         "lla_lastlayer"],
                                  seeds=1, train=TRAIN, progress=False)
    model, _, _ = cached_regressor(tiny, seed=0, progress=False, **TRAIN)
    with torch.no_grad():
        expected = model(tiny.x_test) * tiny.y_std + tiny.y_mean
    by_method = {r.method: r for r in results}
    for name in ("map", "gapa", "gapa_prior", "gapa_random", "ella"):
        assert torch.equal(by_method[name].mean, expected), name
    torch.testing.assert_close(by_method["lla_lastlayer"].mean, expected)
    # GAPA's epistemic variance is not a constant across test points; MAP's std is
    gapa_var = bench.METHODS["gapa"](model, tiny, seed=0).predict(tiny.x_test).var
    assert (gapa_var != gapa_var[0]).any() and (gapa_var >= 0).all()
    map_std = by_method["map"].std
    assert (map_std == map_std[0]).all()


def test_summary_table_marks_the_best_mean_per_column(tiny):
    results = bench.run_benchmark(tiny, ["map", "gapa"], seeds=2, train=TRAIN, progress=False)
    table = bench.summary_table(results)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"map", "gapa"}
    nll = {m: np.mean([r.nll for r in results if r.method == m]) for m in rows}
    best = min(nll, key=nll.get)
    assert f"**{nll[best]:.3f} ±" in rows[best]
    assert "±" in rows["map"] and rows["map"].rstrip().endswith("1.0x |")
    # without MAP there is no ratio to show
    alone = bench.summary_table([r for r in results if r.method == "gapa"]).splitlines()[2]
    assert alone.rstrip().endswith("| — |")


def test_missing_dependency_is_reported_and_skipped(tiny, monkeypatch):
    def missing(*_, **__):
        raise MissingDependencyError("laplace-torch is not installed")

    monkeypatch.setitem(bench.METHODS, "lla_diag", missing)
    logged: list[str] = []
    results = bench.run_benchmark(tiny, ["lla_diag", "map"], seeds=2, train=TRAIN,
                                  progress=False, log=logged.append)
    assert [r.method for r in results] == ["map", "map"]
    assert logged == ["lla_diag: skipped (laplace-torch is not installed)"]


def test_bad_method_names_and_seeds_are_refused(tiny):
    assert bench.parse_methods("all") == list(bench.METHODS)
    assert bench.parse_methods(" map, gapa ") == ["map", "gapa"]
    with pytest.raises(ConfigurationError, match="'lla_full'"):
        bench.parse_methods("map,lla_full")
    with pytest.raises(ConfigurationError, match="seeds must be >= 1"):
        bench.run_benchmark(tiny, ["map"], seeds=0, progress=False)
    with pytest.raises(ConfigurationError, match=r"distinct non-negative.*\[1, 1\]"):
        bench.run_benchmark(tiny, ["map"], seeds=[1, 1], progress=False)


def test_a_seed_list_runs_those_seeds_only(tiny):
    results = bench.run_benchmark(tiny, ["map"], seeds=[2, 0], train=TRAIN, progress=False)
    assert [r.seed for r in results] == [2, 0]


def test_cli_bench_on_csv(tiny, tmp_path, capsys):
    import pandas as pd

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 2))
    path = tmp_path / "t.csv"
    pd.DataFrame({"u": x[:, 0], "v": x[:, 1], "y": np.tanh(x[:, 0]) + 0.1 * x[:, 1]}).to_csv(
        path, index=False)
    out = tmp_path / "r.json"
    code = main(["regression", "--csv", str(path), "--target", "y", "--methods",
                 "map,gapa", "--seeds", "2", "--max-epochs", "2", "--json", str(out),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| gapa | 2 |" in printed and "| map | 2 |" in printed
    assert [(r["method"], r["seed"]) for r in json.loads(out.read_text())] == [
        ("map", 0), ("map", 1), ("gapa", 0), ("gapa", 1)]


def test_cli_bench_refuses_unknown_method(capsys):
    assert main(["regression", "--methods", "nope", "--no-progress"]) == 1
    assert "nope" in capsys.readouterr().err


def test_synthetic_year_has_the_published_shape():
    data = load_dataset("year-synthetic", n=5_000, d=90)
    assert data.n_features == 90 and sum(data.sizes) == 5_000
    assert data.sizes[0] == round(400_000 * 5_000 / 515_345)
    with pytest.raises(DataError, match="takes no path"):
        load_dataset("year-synthetic", "x.txt")


def test_resume_keeps_records_and_runs_only_missing_pairs(tiny, tmp_path, monkeypatch):
    out = tmp_path / "records.json"
    first = bench.run_benchmark(tiny, ["map", "gapa"], seeds=1, train=TRAIN, progress=False,
                                json_path=out)
    calls = []
    original = bench.run_method

    def counting(name, *args, **kw):
        calls.append((name, kw["seed"]))
        return original(name, *args, **kw)

    monkeypatch.setattr(bench, "run_method", counting)
    results = bench.run_benchmark(tiny, ["map", "gapa"], seeds=2, train=TRAIN, progress=False,
                                  json_path=out, resume=True)
    assert calls == [("map", 1), ("gapa", 1)]
    assert {(r.method, r.seed) for r in results} == {(m, s) for m in ("map", "gapa") for s in (0, 1)}
    kept = {r.method: r.nll for r in results if r.seed == 0}
    assert kept == {r.method: r.nll for r in first}
    assert len(json.loads(out.read_text())) == 4
    assert "gapa" in bench.summary_table(results)
    with pytest.raises(ConfigurationError, match="JSON path"):
        bench.run_benchmark(tiny, ["map"], seeds=1, train=TRAIN, progress=False, resume=True)


def test_each_seed_can_draw_its_own_data(tiny):
    """``data_for_seed``: seed s runs on data set s (a shuffled split draws shuffle s), so the
    seeds are independent repetitions; each seed's backbone is trained on its own data."""
    drawn = []

    def data_for_seed(seed: int):
        rng = np.random.default_rng(100 + seed)
        x = rng.normal(size=(400, 3))
        y = np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * rng.normal(size=400)
        drawn.append(seed)
        return from_arrays(x, y, name="tiny", feature_names=["a", "b", "c"],
                           sizes=(240, 80, 80), split="rows")

    results = bench.run_benchmark(tiny, ["map", "gapa"], seeds=2, train=TRAIN, progress=False,
                                  data_for_seed=data_for_seed)
    assert drawn == [0, 1]  # each data set drawn once, shared by the methods of its seed
    same = bench.run_benchmark(tiny, ["map"], seeds=2, train=TRAIN, progress=False)
    by = {(r.method, r.seed): r.nll for r in results}
    assert by[("map", 0)] != same[0].nll and by[("map", 1)] != same[1].nll
