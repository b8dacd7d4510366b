"""GAPA's settings (layers, K, M, amplitude rule) on flights, chosen on validation (RQ4).

Usage:
  python benchmarks/defaults_ablation.py [--split time|shuffled] [--seed S]
      [--layers last,middle,all] [--k 1,8] [--m 512,2048] [--amplitude variance]
      [--out FILE.json] [--plot FILE.png]

Every configuration is scored on the validation split (mean NLL after the benchmark's common
scale-and-noise fit, ``MethodResult.val_nll``) and the lowest is chosen
there. Test metrics are printed only in the final columns, after the choice, for the record:
they choose nothing. ``--plot`` draws validation NLL and the test-time ratio against M, one line
per K.
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", default="last,middle,all")
    p.add_argument("--k", default="1,8")
    p.add_argument("--m", default="512,2048", help="comma-separated; 'none' for the whole cache")
    p.add_argument("--amplitude", default="variance")
    p.add_argument("--out")
    p.add_argument("--plot")
    a = p.parse_args()
    torch.set_num_threads(2)
    data = load_flights(split=a.split, seed=a.seed)
    model, _, _ = cached_regressor(data, seed=a.seed, progress=False)
    base = run_method("map", fit_map, model, data, seed=a.seed)
    rows = []
    grid = itertools.product(a.layers.split(","), map(int, a.k.split(",")),
                             [None if m == "none" else int(m) for m in a.m.split(",")],
                             a.amplitude.split(","))
    print(f"{'config':36s} {'val nll':>8s} {'fit_s':>6s} {'test/map':>8s} | {'test nll':>8s}")
    for layers, k, m, amp in grid:
        fit = partial(fit_gapa, layers=LAYER_SETS[layers], k=k, m=m, amplitude_rule=amp,
                      seed=a.seed)
        res = run_method("gapa", fit, model, data, seed=a.seed)
        val = res.val_nll  # the common calibration's validation NLL: what chooses
        name = f"{layers} k={k} m={m} amp={amp}"
        rows.append({"config": name, "layers": layers, "k": k, "m": m, "amplitude": amp,
                     "val_nll": val, "fit_s": res.fit_s, "test_over_map": res.test_s / base.test_s,
                     "test": {c: getattr(res, c) for c in ("nll", "crps", "cqm", "rmse")}})
        print(f"{name:36s} {val:8.4f} {res.fit_s:6.1f} {rows[-1]['test_over_map']:7.1f}x | "
              f"{res.nll:8.3f}", flush=True)
    chosen = min(rows, key=lambda r: r["val_nll"])
    print(f"chosen on validation: {chosen['config']} (test NLL {chosen['test']['nll']:.3f}; "
          f"MAP {base.nll:.3f})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"split": a.split, "seed": a.seed, "chosen": chosen["config"],
                       "map_test": {c: getattr(base, c) for c in ("nll", "crps", "cqm", "rmse")},
                       "rows": rows}, f, indent=1)
    if a.plot:
        plot(rows, a.plot, n_train=len(data.x_train),
             title=f"GAPA on flights ({a.split} split, seed {a.seed}): validation NLL and cost")
        print(f"plot written to {a.plot}")


def plot(rows: list[dict], path: str, n_train: int, title: str) -> None:
    """Two panels against M (the whole cache drawn at the training size), one line per K and
    layer set: validation NLL, and the test time over the plain network's."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (key, label) in zip(axes, [("val_nll", "validation NLL"),
                                       ("test_over_map", "test time / plain network")],
                                strict=True):
        for line in sorted({(r["layers"], r["k"]) for r in rows}):
            pts = sorted(((r["m"] or n_train), r[key]) for r in rows
                         if (r["layers"], r["k"]) == line)
            ax.plot([m for m, _ in pts], [v for _, v in pts], marker="o",
                    label=f"{line[0]}, K={line[1]}")
        ax.set_xscale("log")
        ax.set_xlabel("M (inducing points; right-most = whole cache)"
                      if any(r["m"] is None for r in rows) else "M (inducing points)")
        ax.set_ylabel(label)
        if key == "test_over_map":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
