"""The demo pipeline end to end on a user's CSV: records complete, metrics equal the metrics
module's, mean untouched."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from gapa_bench import metrics
from gapa_bench.backbones import cached_regressor
from gapa_bench.cli import main
from gapa_bench.data import load_csv
from gapa_bench.regression import RECORD_FIELDS, fit_gapa, fit_map, run_method


@pytest.fixture
def table(tmp_path, monkeypatch):
    monkeypatch.setenv("GAPA_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3))
    y = np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * rng.normal(size=500)
    path = tmp_path / "table.csv"
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "name": ["r"] * 500, "y": y}).to_csv(
        path, index=False
    )
    return path


def test_cli_demo_on_csv_writes_records_and_figure(table, tmp_path, capsys):
    out, fig = tmp_path / "out.json", tmp_path / "fig.png"
    code = main(["demo", "--csv", str(table), "--target", "y", "--json", str(out),
                 "--figure", str(fig), "--no-progress", "--m", "64"])
    assert code == 0
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["map", "gapa"]
    for r in records:
        assert set(RECORD_FIELDS) <= set(r)
        assert all(np.isfinite(r[k]) for k in ("nll", "crps", "cqm", "rmse", "fit_s", "test_s"))
    # same backbone, same mean: RMSE identical
    assert records[0]["rmse"] == records[1]["rmse"]
    assert fig.stat().st_size > 10_000
    assert "| gapa |" in capsys.readouterr().out


def test_cli_demo_reports_missing_target(table, capsys):
    assert main(["demo", "--csv", str(table), "--target", "nope", "--no-progress"]) == 1
    assert "nope" in capsys.readouterr().err


def test_pipeline_scores_equal_metrics_module(table):
    data = load_csv(table, "y")
    model, _, trained = cached_regressor(data, progress=False, max_epochs=5)
    assert trained and not cached_regressor(data, progress=False, max_epochs=5)[2]  # cache hit
    res = run_method("gapa", partial(fit_gapa, layers=["3"], k=2, m=None), model, data)
    gm = res.fitted.handle
    with torch.no_grad():
        assert torch.equal(res.mean, model(data.x_test) * data.y_std + data.y_mean)
    y = data.y_test * data.y_std + data.y_mean
    assert res.nll == metrics.gaussian_nll(res.mean, res.std, y)
    assert res.crps == metrics.crps_gaussian(res.mean, res.std, y)
    assert res.cqm == metrics.cqm(res.mean, res.std, y)
    base = run_method("map", fit_map, model, data)
    assert base.rmse == res.rmse
    # the pipeline's calibration is the library's: same validation fit as gm.calibrate
    cal = gm.calibrate(data.x_val, data.y_val)
    assert (res.scale, res.noise) == (cal.scale, cal.noise)
