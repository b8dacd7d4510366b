"""The language-model tables of RESULTS.md, regenerated from the records of ``gapa-bench lm``,
``benchmarks/lm_propagation.py`` and ``benchmarks/lm_speed.py`` (report kinds ``language``,
``lm_propagation`` and ``lm_speed``). One seed: no standard errors, and the text says so."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .errors import ReportError


def load_record(path: str, root: Path, kind: str) -> dict:
    try:
        rec = json.loads((root / path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"record file {path} not found (under {root})") from None
    except (OSError, ValueError) as e:
        raise ReportError(f"record file {path} cannot be read: {e!r}") from None
    if not isinstance(rec, dict) or rec.get("kind") != kind:
        raise ReportError(f"{path} is not a {kind} record")
    return rec


def run_line(rec: dict, path: str) -> str:
    from .report import _machine  # report imports this module: read at call time

    run = rec.get("run") or {}
    return (f"Record `{path}`: commit {run.get('commit', '?')}, {run.get('date', '?')}, "
            f"{_machine(run.get('machine') or {})}; command `{run.get('command', '?')}`.")


def _best_auroc(scores: dict) -> tuple[str, float]:
    name = max(scores, key=lambda s: scores[s]["auroc"])
    return name, scores[name]["auroc"]


def language_block(paths: Sequence[str], root: Path) -> str:
    """Token-level predictive, error detection, selection, cost and OOD tables of one record."""
    (path,) = paths
    rec = load_record(path, root, "language")
    methods = rec["methods"]
    head = (f"SmolLM2-135M, fit on {rec['n_fit']} sequences of {rec['length']} Austen tokens; "
            f"validation and test: {rec['n_eval']} sequences each from the two halves of "
            f"*{rec['held_out'].capitalize()}*; one seed ({rec['seed']}), so no standard errors. "
            + run_line(rec, path))
    lines = ["| method | NLL | ECE | Brier | error AUROC (entropy) | error AUROC (own best) | "
             "AURC (entropy) | acc @ 80% (entropy) | fit s | test × plain | test peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in methods.items():
        t = r["test"]
        own, own_auc = max(t["error_auroc"].items(), key=lambda kv: kv[1])
        lines.append(
            f"| {name} | {t['nll']:.4f} | {t['ece']:.4f} | {t['brier']:.4f} | "
            f"{t['error_auroc']['entropy']:.3f} | {own_auc:.3f} ({own}) | "
            f"{t['selective']['entropy']['aurc']:.4f} | "
            f"{t['selective']['entropy']['acc@0.8']:.3f} | {r['fit_seconds']:.0f} | "
            f"{r['test_time_ratio']:.2f} | {r['test_peak_extra_mib']:.0f} |")
    sets = list(next(iter(methods.values()))["ood"])
    ood = ["| method | " + " | ".join(f"{s}: entropy | {s}: own best" for s in sets) + " |",
           "|---|" + "---|---|" * len(sets)]
    for name, r in methods.items():
        cells = []
        for s in sets:
            scores = r["ood"][s]
            own, own_auc = _best_auroc(scores)
            cells += [f"{scores['entropy']['auroc']:.3f}", f"{own_auc:.3f} ({own})"]
        ood.append(f"| {name} | " + " | ".join(cells) + " |")
    choices = [f"- `{name}`: " + ", ".join(f"{k} = {v}" for k, v in r["choice"].items()
                                           if k != "candidates")
               for name, r in methods.items() if r["choice"]]
    perplexity = methods.get("plain", next(iter(methods.values())))["test"]["perplexity"]
    return "\n\n".join([
        head, f"Test perplexity of the plain model: {perplexity:.2f} (GAPA's argmax-preserving "
        "predictive keeps the top token, not the probabilities).",
        "Token level (test Austen; next-token NLL in nats, top-1 ECE and Brier; error AUROC: the "
        "score ranks wrong top-1 tokens above right ones; AURC: area under the risk-coverage "
        "curve, lower is better):", "\n".join(lines),
        "Sequence-level OOD AUROC against test Austen (mean of the token scores), by predictive "
        "entropy and by the method's best own score:", "\n".join(ood),
        "Chosen on validation:\n" + "\n".join(choices)])


def lm_propagation_block(paths: Sequence[str], root: Path) -> str:
    """Per block: finite or not, and diagonal / Monte-Carlo ratios of the logit variance."""
    (path,) = paths
    rec = load_record(path, root, "lm_propagation")
    lines = ["| GAPA at block | finite | per logit: median (5–95%) | per token: median (5–95%) |",
             "|---|---|---|---|"]
    for r in rec["blocks"]:
        if not r["finite"]:
            lines.append(f"| {r['block']} | no | | |")
            continue
        q, t = r["per_logit"], r["per_token"]
        lines.append(f"| {r['block']} | yes | {q[1]:.2f} ({q[0]:.2f}–{q[2]:.2f}) | "
                     f"{t[1]:.2f} ({t[0]:.2f}–{t[2]:.2f}) |")
    return (f"{rec['test_sequences']} held-out sequences of {rec['length']} tokens, GAPA fitted "
            f"on {rec['fit_sequences']}; Monte Carlo with {rec['samples']} samples. "
            + run_line(rec, path) + "\n\n" + "\n".join(lines))


def lm_residual_probe_block(paths: Sequence[str], root: Path) -> str:
    """Per later block: median diagonal / Monte-Carlo variance at each compared module."""
    (path,) = paths
    rec = load_record(path, root, "lm_residual_probe")
    parts = [k for k in rec["rows"][0] if k != "block"]
    lines = ["| block | " + " | ".join(f"`{k}`" for k in parts) + " |",
             "|---|" + "---|" * len(parts)]
    for r in rec["rows"]:
        lines.append(f"| {r['block']} | " + " | ".join(f"{r[k]:.2f}" for k in parts) + " |")
    return (f"GAPA at block {rec['gapa_block']}; one held-out sequence of {rec['tokens']} tokens, "
            f"Monte Carlo with {rec['samples']} samples; median over units and tokens. "
            + run_line(rec, path) + "\n\n" + "\n".join(lines)
            + f"\n\nAt the logits: {rec['logits']:.2f}.")


def lm_speed_block(paths: Sequence[str], root: Path) -> str:
    """Per block: ``gm(x)`` over the plain forward, and the fit over one inference pass."""
    (path,) = paths
    rec = load_record(path, root, "lm_speed")
    floor = "floor_ratio" in rec["rows"][0]  # measured since the linear floor was added
    lines = ["| GAPA at block | gm(x) s | plain s | ratio |" + (" linear floor |" if floor else "")
             + " fit s | inference pass s | ratio |",
             "|---|---|---|---|---|---|---|" + ("---|" if floor else "")]
    for r in rec["rows"]:
        lines.append(f"| {r['block']} | {r['gapa_seconds']:.3f} | {r['plain_seconds']:.3f} | "
                     f"{r['ratio']:.2f} |" + (f" {r['floor_ratio']:.2f} |" if floor else "")
                     + f" {r['fit_seconds']:.1f} | "
                     f"{r['fit_inference_seconds']:.1f} | {r['fit_ratio']:.2f} |")
    return (f"Batch 8 x 128, best of the repeats; fit on "
            f"{rec['rows'][0]['fit_tokens']} tokens. " + run_line(rec, path) + "\n\n"
            + "\n".join(lines))
