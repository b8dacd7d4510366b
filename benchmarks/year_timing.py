"""Fit time, test time and peak memory of every regression method at YearPredictionMSD's size.

Usage: python benchmarks/year_timing.py [--methods all] [--max-epochs 5] [--out FILE.json]

The data are synthetic (515,345 x 90, Year's split sizes; :mod:`gapa_bench.data.synthetic`), so only
the cost columns mean anything. Each method runs in its own process, so ``peak MiB`` is that
method's own peak resident memory (data and backbone included; MAP's row is the floor). The
shared backbone is trained first, in a separate process, and reused from the disk cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from gapa_bench.bench import parse_methods


def run(methods: str, args, json_path: str) -> None:
    cmd = [sys.executable, "-m", "gapa.cli", "bench", "regression", "--dataset", "year-synthetic",
           "--methods", methods, "--seeds", "1", "--max-epochs", str(args.max_epochs),
           "--json", json_path, "--no-progress"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default="all")
    p.add_argument("--max-epochs", type=int, default=5)
    p.add_argument("--out", help="also write the records here (JSON)")
    args = p.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        run("map", args, os.path.join(tmp, "warmup.json"))  # trains and caches the backbone
        for name in parse_methods(args.methods):
            path = os.path.join(tmp, f"{name}.json")
            run(name, args, path)
            with open(path) as f:
                records += json.load(f)
            r = records[-1]
            print(f"{name}: fit {r['fit_s']:.1f} s, test {r['test_s']:.2f} s, "
                  f"peak {r['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    base = next((r for r in records if r["method"] == "map"), None)
    print("| method | fit s | test s | test / map | peak MiB |")
    print("|---|---|---|---|---|")
    for r in records:
        ratio = f"{r['test_s'] / base['test_s']:.1f}x" if base else "-"
        print(f"| {r['method']} | {r['fit_s']:.1f} | {r['test_s']:.2f} | {ratio} | "
              f"{r['peak_rss_mib']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
