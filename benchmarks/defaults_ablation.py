"""GAPA's settings (layers, K, M, amplitude rule) on flights: quality and cost (the paper's RQ4).

Usage:
  python benchmarks/defaults_ablation.py [--split time|shuffled] [--layers last,middle,all]
      [--k 1,8] [--m 2048] [--amplitude variance] [--out FILE.json] [--plot FILE.png]

Prints one row per configuration: NLL, CRPS, CQM (minutes), fit and test seconds, and test time
over the plain network's. ``--plot`` draws NLL, CRPS and test-time ratio against M, one line per K.
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from gapa_bench.backbones import cached_regressor
from gapa_bench.data import load_flights
from gapa_bench.regression import fit_gapa, fit_map, run_method

LAYER_SETS = {"last": ["5"], "middle": ["3"], "first": ["1"], "all": ["1", "3", "5"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--split", default="time", choices=["time", "shuffled"])
    p.add_argument("--layers", default="last,middle,all")
    p.add_argument("--k", default="1,8")
    p.add_argument("--m", default="2048", help="comma-separated; 'none' for the whole cache")
    p.add_argument("--amplitude", default="variance")
    p.add_argument("--out")
    p.add_argument("--plot")
    a = p.parse_args()
    torch.set_num_threads(2)
    data = load_flights(split=a.split)
    model, _, _ = cached_regressor(data, progress=False)
    base = run_method("map", fit_map, model, data)
    rows = [base.record() | {"config": "map"}]
    print(f"{'config':40s} {'nll':>7s} {'crps':>7s} {'cqm':>6s} {'fit_s':>6s} {'test_s':>6s}")
    print(f"{'map':40s} {base.nll:7.3f} {base.crps:7.2f} {base.cqm:6.3f} {base.fit_s:6.1f} "
          f"{base.test_s:6.2f}")
    grid = itertools.product(a.layers.split(","), map(int, a.k.split(",")),
                             [None if m == "none" else int(m) for m in a.m.split(",")],
                             a.amplitude.split(","))
    for layers, k, m, amp in grid:
        fit = partial(fit_gapa, layers=LAYER_SETS[layers], k=k, m=m, amplitude_rule=amp)
        res = run_method("gapa", fit, model, data)
        name = f"{layers} k={k} m={m} amp={amp}"
        rows.append(res.record() | {"config": name, "layers": layers, "k": k, "m": m,
                                    "test_over_map": res.test_s / base.test_s})
        print(f"{name:40s} {res.nll:7.3f} {res.crps:7.2f} {res.cqm:6.3f} {res.fit_s:6.1f} "
              f"{res.test_s:6.2f} {res.test_s / base.test_s:6.1f}x  scale={res.scale:.3g}",
              flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    if a.plot:
        plot(rows, a.plot, n_train=len(data.x_train),
             title=f"GAPA on flights ({a.split} split), layers {a.layers}: quality and cost")
        print(f"plot written to {a.plot}")


def plot(rows: list[dict], path: str, n_train: int, title: str) -> None:
    """Three panels against M (the whole cache drawn at the training size), one line per K."""
    gapa_rows = [r for r in rows if r["config"] != "map"]
    base = rows[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, [("nll", "NLL"), ("crps", "CRPS (minutes)"),
                                       ("test_over_map", "test time / plain network")], strict=True):
        for k in sorted({r["k"] for r in gapa_rows}):
            pts = sorted(((r["m"] or n_train), r[key]) for r in gapa_rows if r["k"] == k)
            ax.plot([m for m, _ in pts], [v for _, v in pts], marker="o", label=f"K={k}")
        if key != "test_over_map":
            ax.axhline(base[key], color="k", ls="--", lw=1, label="MAP")
        ax.set_xscale("log")
        whole = any(r["m"] is None for r in gapa_rows)
        ax.set_xlabel("M (inducing points" + ("; right-most = whole cache)" if whole else ")"))
        ax.set_ylabel(label)
        if key == "test_over_map":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
