"""Every benchmark number in the Markdown files, regenerated from the JSON records (issue 16).

A Markdown file marks each generated block with two comment lines::

    <!-- report regression benchmarks/results/a.json benchmarks/results/b.json -->
    ...replaced on every run...
    <!-- /report -->

The first word after ``report`` is the kind (:data:`KINDS`), the rest are record files relative
to the repository root. :func:`fill` regenerates every block of a text, :func:`update` of files
(``check=True``: only say which are stale), :func:`main` is ``python benchmarks/report.py
[--check] [FILES...]``. Typing a number by hand is then never needed, and ``--check`` shows when
a table no longer matches its records.

Everything between the records and the text is a pure function: :func:`load_records` (old and
new record formats, normalised to the new one), the tables and lines of each kind, and
:func:`verdict`. Scores are mean ± standard error over seeds (``ddof=1``); comparisons are paired
by seed, since seed ``s`` is the same backbone (and split) for every method.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gapa.io import atomic_path

from . import lm_report
from .errors import ReportError

DEFAULT_FILES = ("benchmarks/RESULTS.md", "README.md")
END = "<!-- /report -->"
_OPEN = re.compile(r"<!--\s*report\s+(?P<body>.*?)\s*-->")
_FENCE = re.compile(r"(`{3,}|~{3,})")

#: The GAPA rows compared with every peer, and the control that conditions on nothing.
GAPA_ROWS = ("gapa", "gapa_default")
PRIOR = "gapa_prior"
RANDOM = "gapa_random"
#: GAPA with the marginal-likelihood kernel rules instead of the quantile rule.
ML = "gapa_ml"
#: Methods that are not peers in a summary's "best peer": the bare network.
CONTROLS = ("map",)

REGRESSION_FIELDS = ("dataset", "method", "seed", "nll", "crps", "cqm", "rmse", "fit_s", "test_s")
CLASSIFICATION_FIELDS = ("dataset", "method", "seed", "accuracy", "nll", "ece", "brier", "fit_s",
                         "test_s")
#: Old records' ``info["ood_score"]`` values, by the score names of today (kNN's
#: "distance to neighbour 50" is matched by its prefix).
_OLD_SCORE_NAMES = {"total_variance": "logit_variance", "entropy": "entropy",
                    "max_prob": "max_prob"}


# ---------------------------------------------------------------------------------- records


def load_records(paths: Sequence[str], root: str | Path = ".") -> list[dict]:
    """The records of ``paths`` (relative to ``root``), normalised, of one data set.

    A later file's record for the same method and seed replaces an earlier one's, so a rerun
    listed after the original wins instead of being counted twice. One table must describe one
    data set (and split or backbone): mixing them would pair seeds that are not the same network.
    """
    records = [rec for path in paths for rec in _read(Path(root) / path, path)]
    kinds = {_kind(r) for r in records}
    if len(kinds) > 1:
        raise ReportError(f"{', '.join(paths)} mix regression and classification records")
    groups = {(r["dataset"], r.get("backbone")) for r in records}
    splits = {r["split"] for r in records if r.get("split")}
    if len(groups) > 1 or len(splits) > 1:
        raise ReportError(f"{', '.join(paths)} hold several data sets or splits: "
                          f"{sorted(map(str, groups | splits))}; give each its own block")
    by_key: dict[tuple, dict] = {}
    for rec in records:
        by_key[rec["method"], rec["seed"]] = rec  # a rerun keeps the first one's place
    return list(by_key.values())


def _read(path: Path, name: str) -> list[dict]:
    """One record file, each record normalised (:func:`_normalise`)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ReportError(f"record file {name} not found (under {path.parent})") from None
    except (OSError, ValueError) as e:
        raise ReportError(f"record file {name} cannot be read: {e}") from None
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise ReportError(f"record file {name} is not a non-empty JSON list of records")
    return [_normalise(r, f"{name}, record {i}") for i, r in enumerate(data)]


def _kind(rec: dict) -> str:
    return "classification" if "accuracy" in rec else "regression"


def _normalise(rec: dict, where: str) -> dict:
    """A copy in the new format: ``run`` (None when not recorded) and ``info`` always present; for
    classification ``ood_scores`` ``{score: {set: {auroc, fpr95}}}`` and ``own_score``.

    Old classification records hold ``ood`` by the method's own score (named by
    ``info["ood_score"]``, else the entropy) and ``ood_entropy`` when that score is another.
    """
    fields = CLASSIFICATION_FIELDS if _kind(rec) == "classification" else REGRESSION_FIELDS
    missing = [k for k in fields if k not in rec]
    if missing:
        raise ReportError(f"{where} lacks {', '.join(missing)}")
    rec = {**rec, "run": rec.get("run"), "info": rec.get("info") or {}}
    if isinstance(rec.get("split"), str):  # seed s draws shuffle s: one table, "(seed s)"
        rec["split"] = rec["split"].replace(f"(seed {rec['seed']})", "(seed s)")
    return upgrade_classification(rec) if _kind(rec) == "classification" else rec


def upgrade_classification(rec: dict) -> dict:
    """A classification record written before ``ood_scores`` (``ood`` by the method's own
    score, named in ``info["ood_score"]``, else by entropy; ``ood_entropy`` by entropy when the
    own score was another) in today's form, with the scores it had and no max-prob; later
    records pass unchanged. The one reading of old records, for the report and the benchmark."""
    if "ood_scores" in rec:
        return rec
    rec = dict(rec)
    ood, by_entropy = rec.pop("ood", None) or {}, rec.pop("ood_entropy", None) or {}
    old = (rec.get("info") or {}).get("ood_score")
    own = None if old is None else ("distance" if str(old).startswith("distance")
                                    else _OLD_SCORE_NAMES.get(old, old))
    rec["ood_scores"] = {"entropy": by_entropy} if by_entropy else {}
    rec["ood_scores"][own or "entropy"] = ood
    rec["own_score"] = None if own in (None, "entropy", "max_prob") else own
    rec.setdefault("run", None)
    return rec


# ---------------------------------------------------------------------------- statistics


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error over seeds (``ddof=1``); the error is None for one value."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else None


#: Paired differences smaller than this are rounding, not a result: the same probabilities
#: computed twice (a post-hoc method whose variance scale is 0 and the network itself) differ
#: by a few ulps, consistently, which a standard error alone would call a win.
NIL_DIFFERENCE = 1e-6


def verdict(differences: Sequence[float], higher_better: bool = False) -> str:
    """``win``, ``loss`` or ``tie`` of paired differences (GAPA − other): a win is a mean
    difference more than one standard error in the better direction (and more than
    :data:`NIL_DIFFERENCE`). With one seed there is no error to judge by, so the verdict is
    ``1 seed``."""
    mean, se = mean_se(differences)
    if se is None:
        return "1 seed"
    gain = mean if higher_better else -mean
    if abs(gain) <= NIL_DIFFERENCE:
        return "tie"
    return "win" if gain > se else "loss" if gain < -se else "tie"


def _num(x: float, digits: int, signed: bool = False) -> str:
    text = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    return text.replace("-", "−") if signed else text


def _pm(values: Sequence[float], digits: int, signed: bool = False) -> str:
    if len(values) == 0:
        return "—"
    mean, se = mean_se(values)
    text = _num(mean, digits, signed)
    return text if se is None else f"{text} ± {se:.{digits}f}"


def _by_seed(records: list[dict], method: str, value: Callable[[dict], float | None]) -> dict:
    out = {r["seed"]: value(r) for r in records if r["method"] == method}
    return {s: v for s, v in out.items() if v is not None}


def _paired(records, a: str, b: str, value, digits: int = 3,
            higher_better: bool = False) -> tuple[int, str, str] | None:
    """(shared seeds, ``mean ± se`` of a − b, verdict), or None when no seed is shared."""
    va, vb = _by_seed(records, a, value), _by_seed(records, b, value)
    diffs = [va[s] - vb[s] for s in sorted(va.keys() & vb.keys())]
    if not diffs:
        return None
    return len(diffs), _pm(diffs, _shown(diffs, digits), signed=True), verdict(diffs, higher_better)


def _shown(differences: Sequence[float], digits: int) -> int:
    """``digits`` decimals, or more (up to 6) until the standard error shows a non-zero digit:
    a verdict never stands beside ``± 0.000``."""
    _, se = mean_se(differences)
    while se is not None and 0 < se < 0.5 * 10.0**-digits and digits < 6:
        digits += 1
    return digits


def _methods(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in records))


def comparisons(methods: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(gapa row, other, label)``: each GAPA row against every non-GAPA method, and ``gapa``
    against its no-conditioning control; only pairs whose methods are both present."""
    pairs = [(g, m, f"{g} − {m}") for g in GAPA_ROWS if g in methods
             for m in methods if not m.startswith("gapa")]
    if "gapa" in methods and PRIOR in methods:
        pairs.append(("gapa", PRIOR, f"gapa − {PRIOR} (what conditioning adds)"))
    if "gapa" in methods and RANDOM in methods:
        pairs.append(("gapa", RANDOM, f"gapa − {RANDOM} (k-means centroids against random rows)"))
    if "gapa" in methods and ML in methods:
        pairs.append(("gapa", ML, f"gapa − {ML} (quantile rule against marginal likelihood)"))
    return pairs


# --------------------------------------------------------------------------- table pieces


@dataclass(frozen=True)
class Column:
    """One table column: a title, the value of one record (None: not measured), digits, and
    whether higher is better (for the bold best)."""

    title: str
    value: Callable[[dict], float | None]
    digits: int = 3
    higher_better: bool = False
    note: Callable[[str], str] | None = None  # text after a method's cell, e.g. the score used


def table(records: list[dict], columns: Sequence[Column]) -> str:
    """Markdown: one row per method (first appearance), mean ± SE per column, then the ratio of
    mean test times to MAP's (— without MAP).

    The best mean per column is bold, compared as printed: means equal to the shown digits are
    equally best, and a non-finite mean (a failed run) is never best.
    """
    methods = _methods(records)
    cells: dict[tuple[str, str], tuple[float, str]] = {}
    for c in columns:
        for m in methods:
            values = list(_by_seed(records, m, c.value).values())
            if values:
                note = c.note(m) if c.note else ""
                cells[m, c.title] = (mean_se(values)[0], _pm(values, c.digits) + note)
    best = {}
    for c in columns:
        means = [round(v[0], c.digits) for (_, t), v in cells.items()
                 if t == c.title and np.isfinite(v[0])]
        best[c.title] = (max if c.higher_better else min)(means) if means else None
    test_means = {m: mean_se([r["test_s"] for r in records if r["method"] == m])[0]
                  for m in methods}
    head = ["method", "seeds", *(c.title for c in columns), "test / map"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = [m, str(sum(r["method"] == m for r in records))]
        for c in columns:
            mean, text = cells.get((m, c.title), (None, "—"))
            bold = mean is not None and round(mean, c.digits) == best[c.title]
            row.append(f"**{text}**" if bold else text)
        row.append(f"{test_means[m] / test_means['map']:.1f}x" if test_means.get("map") else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def provenance(records: list[dict], paths: Sequence[str]) -> str:
    """Where the numbers come from: files, data set, split or backbone, seeds, and the commits,
    dates and machines of the records' ``run`` (\"not recorded\" for records written before it)."""
    first = records[0]
    what = first["dataset"] + (f", backbone {first['backbone']}" if first.get("backbone") else "")
    splits = {r["split"] for r in records if r.get("split")}
    if _kind(first) == "regression":
        what += f", split {splits.pop() if splits else 'not recorded'}"
    seeds = sorted({r["seed"] for r in records})
    seed_text = (f"{seeds[0]}–{seeds[-1]}" if len(seeds) > 2 and seeds == list(
        range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds)))
    runs = [r["run"] for r in records if r.get("run")]
    text = f"Records {', '.join(f'`{p}`' for p in paths)}: {what}; seed{'s' if len(seeds) > 1 else ''} {seed_text}"
    if not runs:
        return text + "; commit, date and machine not recorded."
    commits = list(dict.fromkeys(str(r.get("commit", "unknown")) for r in runs))
    dates = sorted(str(r["date"])[:10] for r in runs if r.get("date"))
    machines = list(dict.fromkeys(_machine(r.get("machine") or {}) for r in runs))
    text += f"; commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}"
    if dates:
        text += f"; {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")
    text += f"; {'; '.join(machines)}"
    if len(runs) < len(records):
        text += f"; not recorded for {len(records) - len(runs)} of {len(records)} records"
    return text + "."


def _machine(m: dict) -> str:
    parts = [_plural(m[k], k[:-1]) for k in ("cores", "threads") if m.get(k) is not None]
    parts += [m["gpu"]] if m.get("gpu") else []
    return m.get("cpu", "machine not recorded") + (f" ({', '.join(parts)})" if parts else "")


def _value(v) -> str:
    """A setting as a reader writes it: GAPA's layer list ``["1", "3"]`` as ``1+3``."""
    if isinstance(v, list | tuple):
        return "+".join(map(_value, v))
    return v if isinstance(v, str) else json.dumps(v)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def selection_lines(records: list[dict]) -> list[str]:
    """For each method that chose settings on validation (``info["selection"]``): its candidates
    and each chosen setting with the number of seeds that chose it, most frequent first."""
    lines = []
    for m in _methods(records):
        recs = [r for r in records if r["method"] == m]
        sels = [r["info"]["selection"] for r in recs if r["info"].get("selection")]
        if not sels:
            continue
        candidates: dict[str, list] = {}
        for s in sels:
            for name, values in s.get("candidates", {}).items():
                known = candidates.setdefault(name, [])
                known += [v for v in values if v not in known]
        chosen = Counter(", ".join(f"{k}={_value(v)}" for k, v in s.get("chosen", {}).items())
                         for s in sels)
        cand = ", ".join(f"{k} ∈ {{{', '.join(map(_value, v))}}}" for k, v in candidates.items())
        picks = "; ".join(f"{c} ({n}/{len(recs)} seeds)" for c, n in chosen.most_common())
        criteria = ", ".join(dict.fromkeys(s.get("criterion", "validation") for s in sels))
        lines.append(f"- {m} (by {criteria}): candidates {cand}; chosen {picks}")
    return lines


def _section(title: str, body: list[str] | str) -> str:
    body = "\n".join(body) if isinstance(body, list) else body
    return f"{title}\n\n{body}" if body else ""


def _block(records: list[dict], paths: Sequence[str], main: str, paired_title: str,
           paired: str) -> str:
    """A generated block: provenance, the main table, the settings chosen on validation, and
    the paired-difference table under its title (empty parts left out)."""
    parts = [provenance(records, paths), main,
             _section("Settings chosen on validation:", selection_lines(records)),
             _section(paired_title, paired)]
    return "\n\n".join(p for p in parts if p)


def _paired_table(head: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _pair_cells(result: tuple[int, str, str] | None, suffix: str = "") -> tuple[int, list[str]]:
    if result is None:
        return 0, ["—", "—"]
    return result[0], [result[1] + suffix, result[2]]


# ------------------------------------------------------------------------------ regression


def _metric(name: str) -> Callable[[dict], float | None]:
    return lambda r: r.get(name)


REGRESSION_COLUMNS = (
    Column("NLL", _metric("nll")), Column("CRPS", _metric("crps")), Column("CQM", _metric("cqm")),
    Column("RMSE", _metric("rmse")), Column("fit s", _metric("fit_s"), 2),
    Column("test s", _metric("test_s"), 2),
)


def regression_block(records: list[dict], paths: Sequence[str]) -> str:
    """Provenance, the main table, the settings chosen on validation, and the paired
    differences of NLL and CRPS (lower is better)."""
    rows = []
    for a, b, label in comparisons(_methods(records)):
        nll = _paired(records, a, b, _metric("nll"))
        crps = _paired(records, a, b, _metric("crps"))
        if nll is None and crps is None:
            continue
        n, nll_cells = _pair_cells(nll)
        _, crps_cells = _pair_cells(crps)
        rows.append([label, str(n), *nll_cells, *crps_cells])
    paired = _paired_table(["comparison", "seeds", "NLL difference", "NLL verdict",
                            "CRPS difference", "CRPS verdict"], rows)
    return _block(records, paths, table(records, REGRESSION_COLUMNS),
                  "Paired differences on shared seeds (GAPA − other; lower is better; a win or "
                  "loss is beyond one standard error of the per-seed differences):", paired)


# -------------------------------------------------------------------------- classification


def _ood_sets(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(s for r in records for score in r["ood_scores"].values()
                              for s in score))


def _auroc(score: str | None, ood_set: str) -> Callable[[dict], float | None]:
    def value(r: dict) -> float | None:
        return r["ood_scores"].get(score, {}).get(ood_set, {}).get("auroc")
    return value


def own_scores(records: list[dict], ood_set: str) -> dict[str, str]:
    """Each method's own OOD score: the epistemic score its records declare (``own_score``:
    logit variance, mutual information, distance), else the entropy. Declared in code, never
    the best on the test set, so the column chooses nothing with test data."""
    own = {}
    for m in _methods(records):
        recs = [r for r in records if r["method"] == m]
        declared = {r.get("own_score") for r in recs}
        name = declared.pop() if len(declared) == 1 else None
        if not (name and all(_auroc(name, ood_set)(r) is not None for r in recs)):
            name = "entropy"
        own[m] = name
    return own


def _own_auroc(best: dict[str, str], ood_set: str) -> Callable[[dict], float | None]:
    """The AUROC on ``ood_set`` by each record's method's own score (``best``)."""
    return lambda r: _auroc(best.get(r["method"]), ood_set)(r)


def _rotated(metric: str) -> Callable[[dict], float | None]:
    def value(r: dict) -> float | None:
        shifted = r.get("rotated") or {}
        return float(np.mean([v[metric] for v in shifted.values()])) if shifted else None
    return value


def _classification_columns(records: list[dict]) -> tuple[list[Column], list[str], dict]:
    sets = _ood_sets(records)
    own = {s: own_scores(records, s) for s in sets}
    columns = [Column("accuracy", _metric("accuracy"), higher_better=True),
               Column("NLL", _metric("nll")), Column("ECE", _metric("ece")),
               Column("Brier", _metric("brier"))]
    for s in sets:
        columns.append(Column(f"{s} AUROC (entropy)", _auroc("entropy", s), higher_better=True))
        columns.append(Column(
            f"{s} AUROC (own score)", _own_auroc(own[s], s),
            higher_better=True, note=lambda m, s=s: f" ({own[s][m]})"))
    if any(r.get("rotated") for r in records):
        columns += [Column("rotated NLL", _rotated("nll")), Column("rotated ECE", _rotated("ece"))]
    columns += [Column("fit s", _metric("fit_s"), 2), Column("test s", _metric("test_s"), 2)]
    return columns, sets, own


def classification_table(records: list[dict]) -> str:
    """The main classification table: accuracy, NLL, ECE, Brier, AUROC by entropy and by each
    method's own score per OOD set, NLL and ECE averaged over rotation angles, costs."""
    return table(records, _classification_columns(records)[0])


def classification_block(records: list[dict], paths: Sequence[str],
                         columns: list[Column] | None = None) -> str:
    """Provenance, :func:`classification_table` (or ``columns``), settings chosen on
    validation, and paired AUROC differences (higher is better)."""
    default, sets, own = _classification_columns(records)
    columns = default if columns is None else columns
    rows = []
    for a, b, label in comparisons(_methods(records)):
        for s in sets:
            entropy = _paired(records, a, b, _auroc("entropy", s), higher_better=True)
            by_own = _paired(records, a, b, _own_auroc(own[s], s), higher_better=True)
            if entropy is None and by_own is None:
                continue
            n, by_entropy = _pair_cells(entropy)
            n_own, own_cells = _pair_cells(by_own, f" ({own[s].get(a)} vs {own[s].get(b)})")
            rows.append([label, s, str(max(n, n_own)), *by_entropy, *own_cells])
    paired = _paired_table(["comparison", "OOD set", "seeds", "AUROC (entropy) difference",
                            "verdict", "AUROC (own score) difference", "verdict"], rows)
    return _block(records, paths, table(records, columns),
                  "Paired AUROC differences on shared seeds (GAPA − other; higher is better; a "
                  "win or loss is beyond one standard error of the per-seed differences):", paired)


# ---------------------------------------------------------------------------- segmentation


def _shift(metric: str) -> Callable[[dict], float | None]:
    """``metric`` averaged over every shift kind and strength of a segmentation record."""
    def value(r: dict) -> float | None:
        curves = [v[metric] for kind in (r.get("shift") or {}).values() for v in kind.values()]
        return float(np.mean(curves)) if curves else None
    return value


def segmentation_columns(records: list[dict]) -> list[Column]:
    """The classification columns per pixel, with mIoU after accuracy, the shift curves'
    mean NLL and ECE, and the cost of one batch against the U-Net's own forward."""
    columns = _classification_columns(records)[0]
    at = next(i for i, c in enumerate(columns) if c.title == "accuracy") + 1
    columns.insert(at, Column("mIoU", _metric("miou"), higher_better=True))
    at = next(i for i, c in enumerate(columns) if c.title == "fit s")
    columns[at:at] = [Column("shifted NLL", _shift("nll")), Column("shifted ECE", _shift("ece"))]
    columns.append(Column("batch / U-Net", lambda r: r["batch_s"] / r["plain_batch_s"], 2))
    return columns


def _segmentation(paths: Sequence[str], root: Path) -> str:
    records = _of_kind(load_records(paths, root), "classification", paths)
    if not all(r.get("kind") == "segmentation" for r in records):
        raise ReportError(f"{', '.join(paths)}: not all records are segmentation records")
    return classification_block(records, paths, segmentation_columns(records))


# -------------------------------------------------------------------------------- summary


def _stat(records, method, value, digits=3) -> str:
    return _pm(list(_by_seed(records, method, value).values()), digits)


def _gapa_row(methods: Sequence[str]) -> str | None:
    return next((g for g in GAPA_ROWS if g in methods), None)


def _versus(records, value, higher_better: bool, label: str = "", note=lambda m: "") -> str:
    """``gapa LABEL x; best peer p y; gapa − p = d (verdict); conditioning adds c (verdict)``."""
    methods = _methods(records)
    g = _gapa_row(methods)
    peers = [m for m in methods if not m.startswith("gapa") and m not in CONTROLS
             and _by_seed(records, m, value)]
    label = f" {label}" if label else ""
    parts = [f"{g}{label} {_stat(records, g, value)}{note(g)}"] if g else ["no GAPA records"]
    # rank only peers measured on every seed GAPA was: a mean over fewer seeds is another average
    seeds = set(_by_seed(records, g, value)) if g else set()
    full = [m for m in peers if seeds <= set(_by_seed(records, m, value))]
    partial = [m for m in peers if m not in full]
    peers = full or peers
    if partial and full:
        parts.append("not ranked (fewer seeds): " + ", ".join(
            f"{m} {len(_by_seed(records, m, value))}/{len(seeds)}" for m in partial))
    if peers:
        means = {m: mean_se(list(_by_seed(records, m, value).values()))[0] for m in peers}
        p = (max if higher_better else min)(peers, key=means.__getitem__)
        parts.append(f"best peer {p} {_stat(records, p, value)}{note(p)}")
        d = _paired(records, g, p, value, higher_better=higher_better) if g else None
        if d:
            parts.append(f"{g} − {p} = {d[1]} ({d[2]})")
    c = _paired(records, g, PRIOR, value, higher_better=higher_better) if g == "gapa" else None
    if c:
        parts.append(f"conditioning adds {c[1]} ({c[2]})")
    return "; ".join(parts)


def summary_line(records: list[dict], paths: Sequence[str]) -> str:
    """One bullet for one record file (or a ``+``-joined group): GAPA, the best peer (not a
    control), their paired difference, and what conditioning adds; NLL for regression, AUROC by
    entropy and by own score per OOD set for classification."""
    first = records[0]
    seeds = _plural(len({r["seed"] for r in records}), "seed")
    source = " + ".join(f"`{p}`" for p in paths)
    if _kind(first) == "regression":
        where = f"{first['dataset']} ({first.get('split') or 'split not recorded'}, {seeds})"
        return f"- {where}: {_versus(records, _metric('nll'), False, 'NLL')} [{source}]"
    parts = []
    for s in _ood_sets(records):
        best = own_scores(records, s)
        own = _versus(records, _own_auroc(best, s), True, note=lambda m, b=best: f" ({b.get(m)})")
        parts.append(f"{s} AUROC by entropy: {_versus(records, _auroc('entropy', s), True)}; "
                     f"by own score: {own}")
    where = f"{first['dataset']}, {first.get('backbone') or 'backbone not recorded'} ({seeds})"
    return f"- {where}: {'; '.join(parts) or 'no OOD records'} [{source}]"


# ------------------------------------------------------------------------------- markers


def _regression(paths: Sequence[str], root: Path) -> str:
    records = _of_kind(load_records(paths, root), "regression", paths)
    return regression_block(records, paths)


def _classification(paths: Sequence[str], root: Path) -> str:
    records = _of_kind(load_records(paths, root), "classification", paths)
    return classification_block(records, paths)


def _summary(paths: Sequence[str], root: Path) -> str:
    groups = [p.split("+") for p in paths]
    return "\n".join(summary_line(load_records(g, root), g) for g in groups)


def _of_kind(records: list[dict], kind: str, paths: Sequence[str]) -> list[dict]:
    if _kind(records[0]) != kind:
        raise ReportError(f"{', '.join(paths)} hold {_kind(records[0])} records, not {kind}")
    return records


def _conditioning(paths: Sequence[str], root: Path) -> str:
    """One table per ``benchmarks/conditioning_probe.py`` file: per lengthscale factor, the share
    of site variances conditioning moved below half the prior amplitude, and the NLL against
    the no-conditioning control on validation (what chooses) and on test (for the record)."""
    blocks = []
    for path in paths:
        try:
            probe = json.loads((root / path).read_text(encoding="utf-8"))
            rows = probe["rows"]
        except FileNotFoundError:
            raise ReportError(f"probe file {path} not found (under {root})") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ReportError(f"probe file {path} cannot be read: {e!r}") from None
        # probes before the marginal-likelihood rule all used the quantile and max1 rules
        rules = (f"lengthscale rule {probe.get('lengthscale_rule', 'quantile')}, amplitude rule "
                 f"{probe.get('amplitude_rule', 'max1')}")
        head = (f"Probe `{path}`: flights, {probe['split']} split, seed {probe['seed']}, layer "
                f"{probe['layer']}, M = {probe['m']}, {rules}; commit {probe['run']['commit']}.")
        lines = ["| lengthscale factor | val: variance < 50% of prior | val NLL − prior-only | "
                 "test: variance < 50% of prior | test NLL − prior-only |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['factor']:g} | {r['val']['below_50']:.3f} | "
                         f"{_num(r['val_nll_minus_prior'], 4, True)} | "
                         f"{r['test']['below_50']:.3f} | "
                         f"{_num(r['test_nll_minus_prior'], 4, True)} |")
        blocks.append(head + "\n\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def _segmentation_speed(paths: Sequence[str], root: Path) -> str:
    """GAPA's test pass over the U-Net's forward per setting, and the 96x96 memory."""
    (path,) = paths
    rec = lm_report.load_record(path, root, "segmentation_speed")
    floor = "search_ratio" in rec["rows"][0]  # measured since the exact search default
    lines = ["| setting | layer | M | search | U-Net forward s | gm(x) / forward | "
             "classify / forward |" + (" search alone / forward |" if floor else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if floor else "")]
    for r in rec["rows"]:
        lines.append(f"| {r['setting']} | {', '.join(r['layers'])} | {r['m']} | {r['search']} | "
                     f"{r['plain_s']:.3f} | {r['moments_ratio']:.2f} | "
                     f"{r['classify_ratio']:.2f} |"
                     + (f" {r['search_ratio']:.2f} |" if floor else ""))
    m = rec["memory"]
    shape = "x".join(map(str, m["shape"]))
    memory = (f"Memory of one {shape} batch ({m['classes']} classes; its logits alone "
              f"{m['logits_mib']:.0f} MiB), peak resident memory above the process's before "
              f"the call, each in a fresh process: U-Net forward {m['forward_mib']:.0f} MiB, "
              f"`classify` {m['classify_mib']:.0f} MiB.")
    return (f"Batch {rec['batch']} of {rec['side']}x{rec['side']} scenes, best of the repeats, "
            f"{rec['threads']} thread(s). " + lm_report.run_line(rec, path) + "\n\n"
            + "\n".join(lines) + "\n\n" + memory)


def _search_kernels(paths: Sequence[str], root: Path) -> str:
    """Exact search: torch, faiss and the ``exact`` default per cache and batch size."""
    (path,) = paths
    rec = lm_report.load_record(path, root, "search_kernels")
    lines = ["| rows | dims | queries | k | torch ms | faiss ms | exact ms | exact / faster |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        lines.append(f"| {r['rows']} | {r['dim']} | {r['queries']} | {r['k']} | "
                     f"{r['torch_ms']:.2f} | {r['faiss_ms']:.2f} | {r['exact_ms']:.2f} | "
                     f"{r['exact_over_best']:.2f} |")
    worst = max(r["exact_over_best"] for r in rec["rows"])
    return (f"faiss {rec['faiss']}, threshold {rec['threshold']:,} query values, "
            f"{rec['threads']} thread, best of the repeats. " + lm_report.run_line(rec, path)
            + "\n\n" + "\n".join(lines) + f"\n\n`exact` is at most {worst:.2f}x the faster "
            "back end of each row.")


#: What each kind generates from its record files.
KINDS: dict[str, Callable[[Sequence[str], Path], str]] = {
    "regression": _regression, "classification": _classification, "summary": _summary,
    "conditioning": _conditioning, "language": lm_report.language_block,
    "lm_propagation": lm_report.lm_propagation_block, "lm_speed": lm_report.lm_speed_block,
    "lm_residual_probe": lm_report.lm_residual_probe_block,
    "segmentation": _segmentation, "segmentation_speed": _segmentation_speed,
    "search_kernels": _search_kernels,
}


def fill(text: str, root: str | Path = ".", source: str = "<text>") -> str:
    """``text`` with the content of every report block regenerated; everything else, the marker
    lines included, is kept byte for byte, so ``fill(fill(x)) == fill(x)``.

    Markers inside fenced code blocks are left alone (documentation may show the syntax).

    Raises
    ------
    ReportError
        Naming ``source`` and the line: an unknown kind, a block without files, an opening
        marker without its ``<!-- /report -->`` (or with another opening before it), a closing
        marker without an opening, or a record file missing, malformed or of the wrong kind.
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    fence = None
    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        out.append(line)
        i += 1
        fence = _fence(stripped, fence)
        if fence is not None or _FENCE.match(stripped):
            continue
        where = f"{source}:{i}"
        if stripped == END:
            raise ReportError(f"{where}: {END} without an opening <!-- report ... -->")
        opening = _OPEN.fullmatch(stripped)
        if not opening:
            continue
        kind, *paths = opening["body"].split()
        if kind not in KINDS:
            raise ReportError(f"{where}: unknown report kind {kind!r}; use one of "
                              f"{', '.join(KINDS)}")
        if not paths:
            raise ReportError(f"{where}: the {kind} block names no record file")
        end = next((j for j in range(i, len(lines))
                    if lines[j].strip() == END or _OPEN.fullmatch(lines[j].strip())), None)
        if end is None or lines[end].strip() != END:
            raise ReportError(f"{where}: {stripped} has no closing {END}")
        try:
            body = KINDS[kind](paths, Path(root))
        except ReportError as e:
            raise ReportError(f"{where}: {e}") from None
        except (AttributeError, LookupError, TypeError, ValueError) as e:  # a field of wrong shape
            raise ReportError(f"{where}: records of {', '.join(paths)} unusable: {e!r}") from e
        newline = "\r\n" if line.endswith("\r\n") else "\n"
        out.append(newline + body.replace("\n", newline) + newline + newline)
        out.append(lines[end])
        i = end + 1
    return "".join(out)


def _fence(line: str, fence: str | None) -> str | None:
    """The open code fence after ``line`` (None outside one): a fence opens with three or more
    backticks or tildes and closes with a line of at least the same run."""
    run = _FENCE.match(line)
    if fence is None:
        return run.group(1) if run else None
    closes = run and run.group(1)[0] == fence[0] and len(run.group(1)) >= len(fence)
    return None if closes and not line[run.end():].strip() else fence


def update(paths: Sequence[str | Path], root: str | Path = ".", check: bool = False) -> list[Path]:
    """Regenerate the report blocks of the Markdown files ``paths`` (relative to ``root``).

    Every file is filled before any is written, so an error leaves all of them as they were;
    each changed file is then replaced atomically (:func:`gapa.io.atomic_path`).

    Parameters
    ----------
    paths : sequence of str or Path
        The Markdown files.
    root : str or Path
        The repository root: Markdown and record paths are relative to it.
    check : bool
        Write nothing; only report which files are out of date.

    Returns
    -------
    list of Path
        The files that changed (or, with ``check``, would change).
    """
    root = Path(root)
    filled = []
    for p in paths:
        path = root / p
        try:
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
        except OSError as e:
            raise ReportError(f"{p}: cannot read: {e.strerror or e}") from None
        new = fill(text, root, source=str(p))
        if new != text:
            filled.append((path, new))
    if not check:
        for path, new in filled:
            with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(new)
    return [path for path, _ in filled]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The report's arguments on ``p`` (this module's :func:`main`, or a ``report`` subcommand)."""
    p.add_argument("files", nargs="*", default=list(DEFAULT_FILES),
                   help="Markdown files (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 listing the files that are out of date")
    p.add_argument("--root", default=".", help="repository root (default: the current directory)")
    return p


def run(args: argparse.Namespace) -> int:
    """Update (or ``--check``) ``args.files``: 0 when done or up to date, 1 when ``--check``
    finds stale files (listed on stderr), 2 on a marker or record error."""
    try:
        changed = update(args.files, args.root, check=args.check)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    if args.check and changed:
        print("out of date (regenerate with python benchmarks/report.py):", file=sys.stderr)
        for path in changed:
            print(f"  {path}", file=sys.stderr)
        return 1
    for path in changed:
        print(f"updated {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``report [--check] [--root DIR] [FILES...]``; the exit status of :func:`run`."""
    p = argparse.ArgumentParser(prog="report", description="Regenerate the benchmark tables of "
                                "Markdown files from their JSON records.")
    return run(add_arguments(p).parse_args(argv))
