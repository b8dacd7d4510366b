"""Which GAPA defaults (layers, K, M, amplitude rule) score best on flights, and at what cost.

Usage: python benchmarks/defaults_ablation.py [--split time|shuffled] [--out FILE.json]
Prints one row per configuration: NLL, CRPS, CQM (minutes), fit and test seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from gapa.backbones import cached_regressor
from gapa.data import load_flights
from gapa.regression import evaluate_gapa, evaluate_map

LAYER_SETS = {"last": ["5"], "middle": ["3"], "first": ["1"], "all": ["1", "3", "5"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--split", default="time", choices=["time", "shuffled"])
    p.add_argument("--layers", default="last,middle,all")
    p.add_argument("--k", default="1,8")
    p.add_argument("--m", default="2048")
    p.add_argument("--amplitude", default="variance")
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(2)
    data = load_flights(split=a.split)
    model, _, _ = cached_regressor(data, progress=False)
    rows = [evaluate_map(model, data).record() | {"config": "map"}]
    print(f"{'config':40s} {'nll':>7s} {'crps':>7s} {'cqm':>6s} {'fit_s':>6s} {'test_s':>6s}")
    print(f"{'map':40s} {rows[0]['nll']:7.3f} {rows[0]['crps']:7.2f} {rows[0]['cqm']:6.3f}")
    grid = itertools.product(a.layers.split(","), map(int, a.k.split(",")),
                             [None if m == "none" else int(m) for m in a.m.split(",")],
                             a.amplitude.split(","))
    for layers, k, m, amp in grid:
        res, gm = evaluate_gapa(model, data, layers=LAYER_SETS[layers], k=k, m=m, amplitude_rule=amp)
        name = f"{layers} k={k} m={m} amp={amp}"
        cal = gm.calibration
        rows.append(res.record() | {"config": name, "scale": cal.scale, "noise": cal.noise})
        print(f"{name:40s} {res.nll:7.3f} {res.crps:7.2f} {res.cqm:6.3f} {res.fit_s:6.1f} "
              f"{res.test_s:6.2f}  scale={cal.scale:.3g}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
