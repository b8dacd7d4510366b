"""Fit time and peak memory against cache size, and query throughput against M and back end.

Fit: a network whose GAPA layer has ``width`` units (Linear(16, width) -> Tanh -> Linear) is fitted
on ``n`` synthetic inputs streamed batch by batch (never held in memory), with the cache in
memory or in a disk store (float32 or float16). Every configuration runs in its own process, so
its peak resident memory (``VmHWM``) is its own; it is printed beside what ``gm.plan`` predicted.

Queries: one cache of ``--query-rows`` rows; test inputs per second through ``gm(x)`` for each M and
search back end, against the plain network in the same process, with the recall the approximate
back ends measured at fit time.

Usage: python benchmarks/fit_scale.py [--sizes 10000,100000,1000000,2000000] [--widths 64,256]
       [--modes memory,disk32,disk16] [--memory-max 1000000] [--query-rows 200000]
       [--json benchmarks/results/fit-scale.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from _common import best_of, header
from gapa import GAPA
from gapa_bench.memory import peak_rss_mib

IN_FEATURES = 16
BATCH = 8192
MODES = {"memory": None, "disk32": "float32", "disk16": "float16"}


class SyntheticBatches(Dataset):
    """``n`` Gaussian inputs as batches made on demand from their index (nothing is kept)."""

    def __init__(self, n: int, batch: int = BATCH):
        self.n, self.batch = n, batch

    def __len__(self) -> int:
        return -(-self.n // self.batch)

    def __getitem__(self, i: int) -> torch.Tensor:
        rows = min(self.batch, self.n - i * self.batch)
        return torch.randn(rows, IN_FEATURES, generator=torch.Generator().manual_seed(i))


def network(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, width), nn.Tanh(), nn.Linear(width, 1)).eval()


def fit_one(n: int, width: int, mode: str) -> dict:
    """One fit in this process: seconds, peak memory, the plan's prediction."""
    torch.set_num_threads(2)
    model = network(width)
    data = DataLoader(SyntheticBatches(n), batch_size=None)
    gm = GAPA(model, layers=["1"], m=512)
    dtype = MODES[mode]
    plan = gm.plan(n, torch.randn(4, IN_FEATURES), store=dtype is not None,
                   store_dtype=dtype or "float32")
    base = peak_rss_mib()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        t0 = time.perf_counter()
        if dtype is None:
            gm.fit(data, progress=False)
        else:
            gm.fit(data, store=tmp, store_dtype=dtype, progress=False)
        fit_s = time.perf_counter() - t0
    return {"n": n, "width": width, "mode": mode, "fit_s": fit_s, "peak_rss_mib": peak_rss_mib(),
            "before_fit_mib": base, "planned_mib": plan.peak_bytes / 2**20,
            "disk_mib": plan.disk_bytes / 2**20}


def queries(rows: int, widths: list[int], n_queries: int = 10_000) -> list[dict]:
    torch.set_num_threads(2)
    out = []
    for width in widths:
        model = network(width)
        x_train = torch.randn(rows, IN_FEATURES, generator=torch.Generator().manual_seed(1))
        x = torch.randn(n_queries, IN_FEATURES, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            plain = best_of(lambda model=model, x=x: model(x), 5)
        configs = [(512, "torch"), (4096, "torch"), (4096, "faiss"), (None, "torch"),
                   (None, "faiss"), (None, "ivf"), (None, "hnsw")]
        for m, search in configs:
            t0 = time.perf_counter()
            gm = GAPA(model, layers=["1"], m=m, search=search).fit(x_train, progress=False)
            fit_s = time.perf_counter() - t0
            test_s = best_of(lambda gm=gm, x=x: gm(x), 2)
            index = gm.sites["1"].index
            out.append({"rows": rows, "width": width, "m": m, "search": search, "fit_s": fit_s,
                        "queries_per_s": n_queries / test_s, "over_plain": test_s / plain,
                        "recall": index.recall, "index": index.describe()})
            print(f"width {width:4d}  m {m or 'all':>6}  {search:6s}  fit {fit_s:7.1f} s  "
                  f"{n_queries / test_s:10,.0f} queries/s  {test_s / plain:7.1f}x plain  "
                  f"{index.describe()}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="10000,100000,1000000,2000000")
    p.add_argument("--widths", default="64,256")
    p.add_argument("--modes", default="memory,disk32,disk16")
    p.add_argument("--memory-max", type=int, default=1_000_000,
                   help="largest n fitted with the cache in memory")
    p.add_argument("--query-rows", type=int, default=200_000)
    p.add_argument("--skip-queries", action="store_true")
    p.add_argument("--json")
    p.add_argument("--one", nargs=3, metavar=("N", "WIDTH", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(fit_one(int(a.one[0]), int(a.one[1]), a.one[2])))
        return
    print(header())
    widths = [int(w) for w in a.widths.split(",")]
    fits = []
    print(f"{'n':>9} {'width':>5} {'mode':>7} {'fit s':>8} {'peak MiB':>9} {'planned':>8} "
          f"{'disk MiB':>8}")
    for n in (int(s) for s in a.sizes.split(",")):
        for width in widths:
            for mode in a.modes.split(","):
                if mode == "memory" and n > a.memory_max:
                    continue
                res = subprocess.run([sys.executable, __file__, "--one", str(n), str(width), mode],
                                     capture_output=True, text=True, check=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                fits.append(r)
                print(f"{n:>9,} {width:>5} {mode:>7} {r['fit_s']:>8.1f} {r['peak_rss_mib']:>9.0f} "
                      f"{r['before_fit_mib'] + r['planned_mib']:>8.0f} {r['disk_mib']:>8.0f}",
                      flush=True)
    results = {"header": header(), "fits": fits}
    if not a.skip_queries:
        results["queries"] = queries(a.query_rows, widths)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
