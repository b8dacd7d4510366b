"""gapa_bench.report: tables regenerated from records, marker filling, stale-file check.

The expected numbers were computed by hand from the fixtures in fixtures/report/ (see the
comments beside each)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from gapa_bench import report
from gapa_bench.errors import ReportError
from gapa_bench.report import DEFAULT_FILES, update

FIXTURES = Path(__file__).parent / "fixtures" / "report"
REG = "fixtures/report/regression.json"
CLS = "fixtures/report/classification.json"
OLD = "fixtures/report/classification-old.json"
ROOT = Path(__file__).parent  # record paths in markers are relative to it here


def row(markdown: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in\n{markdown}")


def regression() -> str:
    return report.regression_block(report.load_records([REG], ROOT), [REG])


def classification() -> str:
    return report.classification_block(report.load_records([CLS], ROOT), [CLS])


# ------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize(("diffs", "higher_better", "expected"), [
    ([-1, -1.1, -0.9], False, "win"),
    ([0.1, -0.1, 0.05], False, "tie"),
    ([1, 1.2, 0.8], False, "loss"),
    ([-1, -1.1, -0.9], True, "loss"),  # AUROC: higher is better, so the same numbers lose
    ([1, 1.2, 0.8], True, "win"),
    ([0.3], False, "1 seed"),
    ([2e-8, 3e-8, 2.5e-8], True, "tie"),  # a few ulps of the same probabilities: rounding
])
def test_verdict(diffs, higher_better, expected):
    assert report.verdict(diffs, higher_better) == expected


def test_mean_se_uses_ddof_1():
    mean, se = report.mean_se([1.0, 2.0, 3.0])  # sd 1 (ddof=1), se 1/sqrt(3)
    assert mean == pytest.approx(2.0)
    assert se == pytest.approx(3 ** -0.5)
    assert report.mean_se([4.0]) == (4.0, None)


# ------------------------------------------------------------------------------ regression


def test_regression_table_mean_se_and_bold():
    md = regression()
    # map NLL 5.2, 5.4, 5.3: mean 5.3, sd 0.1, se 0.1/sqrt(3) = 0.0577
    assert row(md, "map")[2] == "5.300 ± 0.058"
    # gapa NLL 4.9, 4.99, 5.11: mean 5.0, sd sqrt(0.0222/2) = 0.1054, se 0.0608; the lowest
    gapa = row(md, "gapa")
    assert gapa[:4] == ["gapa", "3", "**5.000 ± 0.061**", "**19.500 ± 0.000**"]
    assert gapa[-1] == "3.0x"  # test 0.9 s over map's 0.3 s
    assert row(md, "lla_diag")[-3:] == ["40.00 ± 0.00", "30.00 ± 0.00", "100.0x"]
    assert row(md, "map")[6] == "**0.30 ± 0.00**"  # fastest fit, 2 decimals for seconds
    assert "**" not in row(md, "gapa_default")[2]


def test_regression_paired_differences():
    md = regression()
    # gapa - lla_diag NLL: -0.1, -0.11, -0.09 -> mean -0.1, se 0.01/sqrt(3)
    assert row(md, "gapa − lla_diag")[1:4] == ["3", "−0.100 ± 0.006", "win"]
    # gapa_default - lla_diag NLL: 1, 1.2, 0.8 -> se 0.2/sqrt(3) = 0.115
    assert row(md, "gapa_default − lla_diag")[2:4] == ["+1.000 ± 0.115", "loss"]
    # gapa - gapa_prior NLL: -0.1, 0.1, -0.05 -> mean -0.017, se 0.060
    conditioning = row(md, "gapa − gapa_prior (what conditioning adds)")
    assert conditioning[2:4] == ["−0.017 ± 0.060", "tie"]
    compared = [line.split("|")[1].strip() for line in md.splitlines() if " − " in line
                and line.startswith("|")]
    assert compared == ["gapa − map", "gapa − lla_diag", "gapa_default − map",
                        "gapa_default − lla_diag", "gapa − gapa_prior (what conditioning adds)"]


def test_regression_provenance_and_chosen_settings():
    md = regression()
    assert ("flights, split time-ordered 60/20/20; seeds 0–2; commit abc123def456; "
            "2026-12-07 to 2026-12-08; Test CPU 3000 (2 cores, 2 threads).") in md
    assert ("- gapa (by validation NLL): candidates layers ∈ {1, 3, 5}, m ∈ {256, 1024}; "
            "chosen layers=3, m=1024 (2/3 seeds); layers=1, m=256 (1/3 seeds)") in md


def test_old_regression_records_say_not_recorded(tmp_path):
    old = [{k: v for k, v in r.items() if k != "run"}
           for r in json.loads((FIXTURES / "regression.json").read_text())]
    for r in old:
        r["info"].pop("selection", None)
    (tmp_path / "old.json").write_text(json.dumps(old))
    md = report.regression_block(report.load_records(["old.json"], tmp_path), ["old.json"])
    assert "commit, date and machine not recorded." in md
    assert "Settings chosen" not in md
    assert row(md, "gapa")[2] == "**5.000 ± 0.061**"


def test_a_later_file_replaces_a_record_and_one_table_is_one_data_set(tmp_path):
    recs = json.loads((FIXTURES / "regression.json").read_text())
    rerun = [dict(r, nll=r["nll"] + 1) for r in recs if r["method"] == "map"]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "b.json").write_text(json.dumps(rerun))
    merged = report.load_records(["a.json", "b.json"], tmp_path)
    assert len(merged) == len(recs)
    assert row(report.table(merged, report.REGRESSION_COLUMNS), "map")[2] == "6.300 ± 0.058"
    assert report._methods(merged)[0] == "map"  # the rerun keeps its place
    (tmp_path / "c.json").write_text(json.dumps([dict(recs[0], dataset="year")]))
    with pytest.raises(ReportError, match="several data sets"):
        report.load_records(["a.json", "c.json"], tmp_path)


def test_seeds_that_draw_their_own_shuffle_make_one_table(tmp_path):
    recs = [dict(r, split=f"shuffled (seed {r['seed']}) 60/20/20")
            for r in json.loads((FIXTURES / "regression.json").read_text())]
    (tmp_path / "s.json").write_text(json.dumps(recs))
    merged = report.load_records(["s.json"], tmp_path)
    assert {r["split"] for r in merged} == {"shuffled (seed s) 60/20/20"}
    assert "split shuffled (seed s) 60/20/20" in report.regression_block(merged, ["s.json"])
    other = [dict(recs[0], split="shuffled (seed 7) 60/20/20")]  # another seed's shuffle
    (tmp_path / "t.json").write_text(json.dumps(other))
    with pytest.raises(ReportError, match="several data sets or splits"):
        report.load_records(["s.json", "t.json"], tmp_path)


# -------------------------------------------------------------------------- classification


def test_classification_table():
    md = classification()
    # gapa AUROC by logit_variance 0.96, 0.97, 0.98 beats its entropy and max_prob
    gapa = row(md, "gapa")
    assert gapa[2] == "**0.890 ± 0.006**"  # accuracy: higher is better
    assert gapa[6:8] == ["**0.910 ± 0.006**", "**0.970 ± 0.006 (logit_variance)**"]
    assert row(md, "knn")[7] == "0.960 ± 0.006 (distance)"
    assert row(md, "map")[7] == "0.810 ± 0.006 (entropy)"  # entropy 0.81 > max_prob 0.80
    # rotated NLL: (0.3 + 5.0 + s) / 2 over seeds 0..2 -> 3.15, se 0.5/sqrt(3)
    assert row(md, "knn")[8] == "**3.150 ± 0.289**"
    assert "- gapa (by validation NLL): candidates m ∈ {128, 512}; chosen m=512 (3/3 seeds)" in md
    assert "fashion-mnist, backbone mlp; seeds 0–2" in md


def test_classification_paired_differences():
    md = classification()
    # by entropy: gapa - knn = 0.10, 0.09, 0.11 -> se 0.01/sqrt(3); by own score:
    # logit_variance - distance = 0.01 on every seed
    knn = row(md, "gapa − knn")
    assert knn[1:5] == ["mnist", "3", "+0.100 ± 0.006", "win"]
    assert knn[5:] == ["+0.010 ± 0.000 (logit_variance vs distance)", "win"]
    # conditioning by entropy: 0.02, 0.01, 0.0 -> +0.010 ± 0.006, more than 1 SE: a win
    assert row(md, "gapa − gapa_prior (what conditioning adds)")[3:5] == ["+0.010 ± 0.006", "win"]


def test_old_classification_records_load():
    old = report.load_records([OLD], ROOT)
    gapa = next(r for r in old if r["method"] == "gapa")
    assert gapa["own_score"] == "logit_variance"  # info["ood_score"] total_variance
    assert gapa["ood_scores"]["logit_variance"]["mnist"]["auroc"] == 0.99
    assert gapa["ood_scores"]["entropy"]["mnist"]["auroc"] == 0.91
    plain = next(r for r in old if r["method"] == "map")
    assert plain["ood_scores"] == {"entropy": {"mnist": {"auroc": 0.82, "fpr95": 0.55}}}
    assert plain["own_score"] is None and plain["run"] is None
    md = report.classification_block(old, [OLD])
    assert row(md, "gapa")[6:8] == ["**0.910**", "**0.990 (logit_variance)**"]  # one seed
    assert row(md, "gapa − map")[3:5] == ["+0.090", "1 seed"]
    assert "commit, date and machine not recorded" in md


# -------------------------------------------------------------------------------- summary


def test_summary_lines(tmp_path):
    md = report.fill(f"<!-- report summary {REG} {CLS} -->\n{report.END}\n", ROOT)
    reg, cls = [line for line in md.splitlines() if line.startswith("- ")]
    assert reg.startswith("- flights (time-ordered 60/20/20, 3 seeds): gapa NLL 5.000 ± 0.061; "
                          "best peer lla_diag 5.100 ± 0.058; gapa − lla_diag = −0.100 ± 0.006 "
                          "(win); conditioning adds −0.017 ± 0.060 (tie)")
    assert "by own score: gapa 0.970 ± 0.006 (logit_variance); best peer knn" in cls
    # map is a control, never the best peer, even with the lowest NLL
    recs = json.loads((FIXTURES / "regression.json").read_text())
    for r in recs:
        r["nll"] -= 2 * (r["method"] == "map")
    (tmp_path / "r.json").write_text(json.dumps(recs))
    line = report.summary_line(report.load_records(["r.json"], tmp_path), ["r.json"])
    assert "best peer lla_diag" in line


# -------------------------------------------------------------------------------- markers


DOC = f"""# Results

Text before, with an inline `<!-- report regression x.json -->` left alone.

<!-- report regression {REG} -->
stale table
<!-- /report -->

```
<!-- report regression missing.json -->
```

Text after.
"""


def test_fill_replaces_only_inside_markers_and_is_idempotent():
    out = report.fill(DOC, ROOT)
    assert "stale table" not in out
    assert "| gapa | 3 | **5.000 ± 0.061**" in out
    before, block = DOC.split("stale table\n")
    assert out.startswith(before)  # everything up to the block, the marker included
    assert out.endswith(block)  # the closing marker and everything after, the fence included
    assert report.fill(out, ROOT) == out


@pytest.mark.parametrize(("text", "message"), [
    (f"a\n\n<!-- report regression {REG} -->\nno end\n", "doc.md:3: .* has no closing"),
    (f"a\n<!-- report regression {REG} -->\n<!-- report regression {REG} -->\n{report.END}\n",
     "doc.md:2: .* has no closing"),
    ("a\n<!-- report regression fixtures/report/none.json -->\n<!-- /report -->\n",
     "doc.md:2: record file fixtures/report/none.json not found"),
    (f"<!-- report table {REG} -->\n<!-- /report -->\n", "doc.md:1: unknown report kind 'table'"),
    ("<!-- report regression -->\n<!-- /report -->\n", "doc.md:1: .*names no record file"),
    ("a\nb\n<!-- /report -->\n", "doc.md:3: .*without an opening"),
    (f"<!-- report classification {REG} -->\n<!-- /report -->\n", "doc.md:1: .*not classification"),
])
def test_fill_errors_name_the_file_and_line(text, message):
    with pytest.raises(ReportError, match=message):
        report.fill(text, ROOT, source="doc.md")


def test_malformed_records_raise_report_error(tmp_path):
    recs = json.loads((FIXTURES / "classification.json").read_text())
    (tmp_path / "short.json").write_text(json.dumps([{k: v for k, v in recs[0].items()
                                                      if k != "nll"}]))
    (tmp_path / "shape.json").write_text(json.dumps([dict(recs[0], rotated=[1, 2])]))
    (tmp_path / "text.json").write_text("not json")
    for name, message in [("short", r"doc\.md:1: short\.json, record 0 lacks nll"),
                          ("shape", r"doc\.md:1: records of shape\.json unusable"),
                          ("text", r"doc\.md:1: record file text\.json cannot be read")]:
        text = f"<!-- report classification {name}.json -->\n{report.END}\n"
        with pytest.raises(ReportError, match=message):
            report.fill(text, tmp_path, source="doc.md")


def copy_tree(tmp_path: Path) -> Path:
    """A repository root with the fixtures and one stale and one fresh Markdown file."""
    shutil.copytree(FIXTURES, tmp_path / "fixtures" / "report")
    (tmp_path / "stale.md").write_text(DOC)
    (tmp_path / "fresh.md").write_text(report.fill(DOC, tmp_path))
    return tmp_path


def test_update_check_reports_stale_files_and_writes_nothing(tmp_path):
    root = copy_tree(tmp_path)
    assert report.update(["stale.md", "fresh.md"], root, check=True) == [root / "stale.md"]
    assert (root / "stale.md").read_text() == DOC
    assert report.update(["stale.md", "fresh.md"], root) == [root / "stale.md"]
    assert (root / "stale.md").read_text() == (root / "fresh.md").read_text()
    assert report.update(["stale.md", "fresh.md"], root, check=True) == []
    assert sorted(p.name for p in root.iterdir()) == ["fixtures", "fresh.md", "stale.md"]


def test_update_writes_nothing_when_one_file_fails(tmp_path):
    root = copy_tree(tmp_path)
    (root / "bad.md").write_text("<!-- report regression fixtures/report/regression.json -->\n")
    with pytest.raises(ReportError, match=r"bad\.md:1"):
        report.update(["stale.md", "bad.md"], root)
    assert (root / "stale.md").read_text() == DOC
    with pytest.raises(ReportError, match=r"nope\.md"):
        report.update(["nope.md"], root)


def test_main_check_exit_status(tmp_path, capsys):
    root = copy_tree(tmp_path)
    args = ["--root", str(root), "stale.md", "fresh.md"]
    assert report.main(["--check", *args]) == 1
    err = capsys.readouterr().err
    assert "stale.md" in err and "fresh.md" not in err
    assert report.main(args) == 0
    assert report.main(["--check", *args]) == 0
    (root / "bad.md").write_text("<!-- report nonsense x.json -->\n<!-- /report -->\n")
    assert report.main(["--root", str(root), "bad.md"]) == 2
    assert "bad.md:1: unknown report kind" in capsys.readouterr().err


def test_the_repository_tables_match_their_records():
    """RESULTS.md and the README hold no hand-edited benchmark table: regenerating them from
    the committed records changes nothing (run ``make report`` after a benchmark run)."""
    root = Path(__file__).resolve().parents[2]
    assert update(list(DEFAULT_FILES), root=root, check=True) == []


def test_own_score_is_the_declared_one_not_the_best_on_test():
    def rec(seed, declared):
        return {"method": "m", "seed": seed, "own_score": declared,
                "ood_scores": {"entropy": {"mnist": {"auroc": 0.9}},
                               "logit_variance": {"mnist": {"auroc": 0.6}}}}
    assert report.own_scores([rec(0, "logit_variance"), rec(1, "logit_variance")],
                             "mnist") == {"m": "logit_variance"}
    # no declared score (MAP, temperature): the entropy
    assert report.own_scores([rec(0, None)], "mnist") == {"m": "entropy"}


def test_conditioning_probe_block(tmp_path):
    probe = {"split": "time", "seed": 0, "layer": "3", "m": 256, "run": {"commit": "abc"},
             "rows": [{"factor": 0.5, "val": {"below_50": 0.25}, "test": {"below_50": 0.125},
                       "val_nll_minus_prior": 0.0059, "test_nll_minus_prior": -0.008}]}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    text = "<!-- report conditioning probe.json -->\n<!-- /report -->\n"
    out = report.fill(text, tmp_path)
    assert "| 0.5 | 0.250 | +0.0059 | 0.125 | −0.0080 |" in out
    with pytest.raises(ReportError, match=r"missing\.json"):
        report.fill("<!-- report conditioning missing.json -->\n<!-- /report -->\n", tmp_path)


def test_summary_ranks_only_peers_with_every_seed():
    def rec(method, seed, nll):
        return {"dataset": "d", "split": "time", "method": method, "seed": seed, "nll": nll,
                "crps": 1.0, "cqm": 0.1, "rmse": 1.0, "fit_s": 1.0, "test_s": 1.0, "info": {},
                "run": None}
    records = [rec("gapa", s, 5.0) for s in range(3)] + [rec("lla", s, 5.1) for s in range(3)]
    records.append(rec("dropout", 0, 4.0))  # far better, but on one seed of three
    line = report.summary_line(records, ["f.json"])
    assert "best peer lla" in line and "not ranked (fewer seeds): dropout 1/3" in line


def test_a_verdict_never_stands_beside_a_zero_standard_error():
    records = [{"method": m, "seed": s, "nll": v}
               for s, (a, b) in enumerate([(1.0001, 1.0), (2.0002, 2.0), (3.00015, 3.0)])
               for m, v in (("gapa", a), ("map", b))]
    n, text, verdict = report._paired(records, "gapa", "map", lambda r: r["nll"])
    assert (n, verdict) == (3, "loss")
    assert text == "+0.00015 ± 0.00003"  # three decimals would read +0.000 ± 0.000
    wide = [dict(r, nll=r["nll"] * (1 + r["seed"]) if r["method"] == "gapa" else r["nll"])
            for r in records]
    text = report._paired(wide, "gapa", "map", lambda r: r["nll"])[1]
    assert re.fullmatch(r"\+\d+\.\d{3} ± \d+\.\d{3}", text), text  # a visible SE keeps three


def test_speed_blocks(tmp_path):
    """The LM and segmentation speed records make their tables; another kind is refused."""
    run = {"commit": "abc", "date": "2026-12-07", "machine": {}, "command": "x"}
    seg = {"kind": "segmentation_speed", "batch": 32, "side": 64, "threads": 1, "run": run,
           "rows": [{"setting": "u-net", "layers": ["dec1.5"], "m": 512, "search": "faiss",
                     "plain_s": 0.08, "moments_ratio": 1.75, "classify_ratio": 2.125}],
           "memory": {"shape": [32, 1, 96, 96], "classes": 11, "logits_mib": 12.4,
                      "forward_mib": 60.0, "classify_mib": 150.0}}
    lm = {"kind": "lm_speed", "run": run, "rows": [
        {"block": 29, "gapa_seconds": 5.0, "plain_seconds": 4.0, "ratio": 1.25,
         "fit_seconds": 50.0, "fit_inference_seconds": 40.0, "fit_ratio": 1.25,
         "fit_tokens": 8192}]}
    (tmp_path / "seg.json").write_text(json.dumps(seg))
    (tmp_path / "lm.json").write_text(json.dumps(lm))
    out = report.fill("<!-- report segmentation_speed seg.json -->\n<!-- /report -->\n"
                      "<!-- report lm_speed lm.json -->\n<!-- /report -->\n", tmp_path)
    assert "| u-net | dec1.5 | 512 | faiss | 0.080 | 1.75 | 2.12 |" in out
    assert "32x1x96x96 batch" in out and "`classify` 150 MiB" in out
    assert "| 29 | 5.000 | 4.000 | 1.25 | 50.0 | 40.0 | 1.25 |" in out
    with pytest.raises(ReportError, match="not a segmentation_speed record"):
        report.fill("<!-- report segmentation_speed lm.json -->\n<!-- /report -->\n", tmp_path)


def test_search_floor_and_kernel_blocks(tmp_path):
    """Speed records with their floors (the search's own time, the linear layers' second
    product) show them; search kernels tabulate."""
    run = {"commit": "abc", "date": "2026-12-07", "machine": {}, "command": "x"}
    seg = {"kind": "segmentation_speed", "batch": 32, "side": 64, "threads": 1, "run": run,
           "rows": [{"setting": "u-net", "layers": ["dec1.5"], "m": 512, "search": "exact",
                     "plain_s": 0.08, "moments_ratio": 1.75, "classify_ratio": 2.125,
                     "search_s": 0.02, "conditioning_s": 0.01, "search_ratio": 0.25}],
           "memory": {"shape": [32, 1, 96, 96], "classes": 11, "logits_mib": 12.4,
                      "forward_mib": 60.0, "classify_mib": 150.0}}
    kernels = {"kind": "search_kernels", "faiss": "1.15.1", "threshold": 128000, "threads": 1,
               "run": run, "rows": [
                   {"rows": 512, "dim": 8, "queries": 16800, "k": 1, "torch_ms": 19.7,
                    "faiss_ms": 2.4, "exact_ms": 2.5, "exact_over_best": 2.5 / 2.4},
                   {"rows": 512, "dim": 8, "queries": 16, "k": 1, "torch_ms": 0.04,
                    "faiss_ms": 0.05, "exact_ms": 0.04, "exact_over_best": 1.0}]}
    lm = {"kind": "lm_speed", "run": run, "rows": [
        {"block": 2, "gapa_seconds": 12.0, "plain_seconds": 4.0, "ratio": 3.0,
         "floor_seconds": 8.4, "floor_ratio": 2.1, "fit_seconds": 50.0,
         "fit_inference_seconds": 40.0, "fit_ratio": 1.25, "fit_tokens": 8192}]}
    (tmp_path / "seg.json").write_text(json.dumps(seg))
    (tmp_path / "kernels.json").write_text(json.dumps(kernels))
    (tmp_path / "lm.json").write_text(json.dumps(lm))
    out = report.fill("<!-- report segmentation_speed seg.json -->\n<!-- /report -->\n"
                      "<!-- report search_kernels kernels.json -->\n<!-- /report -->\n"
                      "<!-- report lm_speed lm.json -->\n<!-- /report -->\n", tmp_path)
    assert "| 2 | 12.000 | 4.000 | 3.00 | 2.10 | 50.0 | 40.0 | 1.25 |" in out
    assert "| search alone / forward |" in out
    assert "| u-net | dec1.5 | 512 | exact | 0.080 | 1.75 | 2.12 | 0.25 |" in out
    assert "| 512 | 8 | 16800 | 1 | 19.70 | 2.40 | 2.50 | 1.04 |" in out
    assert "threshold 128,000 query values" in out and "at most 1.04x the faster" in out


def test_lm_residual_probe_block(tmp_path):
    run = {"commit": "abc", "date": "2026-12-08", "machine": {}, "command": "x"}
    probe = {"kind": "lm_residual_probe", "gapa_block": 5, "samples": 64, "tokens": 64,
             "logits": 2.46, "run": run, "rows": [
                 {"block": 6, "input_layernorm": 1.0, "mlp": 1.7, "residual": 1.69}]}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    out = report.fill("<!-- report lm_residual_probe probe.json -->\n<!-- /report -->\n",
                      tmp_path)
    assert "| block | `input_layernorm` | `mlp` | `residual` |" in out
    assert "| 6 | 1.00 | 1.70 | 1.69 |" in out
    assert "GAPA at block 5" in out and "At the logits: 2.46." in out
