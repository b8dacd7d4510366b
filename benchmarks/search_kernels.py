"""Exact neighbour search: torch against faiss's flat index, and what the ``exact`` default picks.

For caches of 512 and 4,096 rows of 8, 64 and 576 dimensions (a U-Net's last decoder block, a
small MLP, a transformer's MLP input), at query batches around
``gapa.gp.search.FAISS_MIN_QUERY_VALUES`` values (half of it, just below, just above, four times
it) and at 16 queries, k = 1 and 8: the best of ``--repeats`` calls of each back end, one
thread, in one process. ``exact`` should track the faster of the two everywhere.

Usage: python benchmarks/search_kernels.py [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys

import faiss
import torch

from _common import best_of, header
from gapa.gp.search import FAISS_MIN_QUERY_VALUES, NeighbourIndex
from gapa.io import atomic_path
from gapa_bench.provenance import run_info

ROWS = (512, 4096)
DIMS = (8, 64, 576)
#: Query batches as multiples of the threshold (in values), and one small batch.
SCALES = (0.5, 0.95, 1.05, 4.0)
SMALL_BATCH = 16
KS = (1, 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    run = run_info(sys.argv)
    print(header(f"faiss {faiss.__version__}, threshold {FAISS_MIN_QUERY_VALUES} query values"))
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in ROWS:
        for d in DIMS:
            points = torch.randn(n, d, generator=g)
            backends = {name: NeighbourIndex(points, name) for name in ("torch", "faiss", "exact")}
            batches = sorted({SMALL_BATCH,
                              *(round(s * FAISS_MIN_QUERY_VALUES / d) for s in SCALES)})
            for b in batches:
                queries = torch.randn(b, d, generator=g)
                for k in KS:
                    ms = {}
                    for name, index in backends.items():
                        index.search(queries, k)  # warm-up
                        ms[name] = 1e3 * best_of(lambda i=index, q=queries, k=k: i.search(q, k),
                                                 args.repeats)
                    row = {"rows": n, "dim": d, "queries": b, "k": k,
                           **{f"{m}_ms": v for m, v in ms.items()},
                           "exact_over_best": ms["exact"] / min(ms["torch"], ms["faiss"])}
                    rows.append(row)
                    print(f"rows {n:>5} d {d:>3} queries {b:>6} k {k}: torch {ms['torch']:8.2f} ms, "
                          f"faiss {ms['faiss']:8.2f} ms, exact {ms['exact']:8.2f} ms "
                          f"({row['exact_over_best']:.2f}x the faster)", flush=True)
    if args.json_path:
        record = {"kind": "search_kernels", "faiss": faiss.__version__,
                  "threshold": FAISS_MIN_QUERY_VALUES, "rows": rows, "threads": 1, "run": run}
        with atomic_path(args.json_path) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
