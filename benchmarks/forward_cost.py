"""GAPA forward time over the plain forward on the flights MLP (batch 1024), and fit time over one
inference pass over the training set, with the split of the cost (search, conditioning,
propagation) per setting.

Usage: python benchmarks/forward_cost.py [--layer 3] [--m none,512,2048,8192] [--k 1,4,16]
       [--search torch,faiss] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import best_of, header
from gapa import GAPA
from gapa_bench.backbones import cached_regressor
from gapa_bench.data import load_flights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layer", default="3")
    p.add_argument("--m", default="none,512,2048,8192")
    p.add_argument("--k", default="1,4,16")
    p.add_argument("--search", default="torch,faiss")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(2)
    data = load_flights()
    model, _, _ = cached_regressor(data, progress=False)
    x = data.x_test[: a.batch]
    with torch.no_grad():
        plain = best_of(lambda: model(x), a.repeats * 4)
        train_pass = best_of(lambda: [model(b) for b in data.x_train.split(1024)], 2)
    print(header())
    print(f"plain forward, batch {a.batch}: {plain * 1e3:.2f} ms; one inference pass over "
          f"{len(data.x_train)} training rows: {train_pass:.2f} s\n")
    print("| M | K | search | GAPA / plain | search ms | conditioning ms | propagation ms "
          "| fit s | fit / train pass |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m_str in a.m.split(","):
        m = None if m_str == "none" else int(m_str)
        for search in a.search.split(","):
            t0 = time.perf_counter()
            base = GAPA(model, [a.layer], k=1, m=m, search=search).fit(data.x_train, progress=False)
            fit_s = time.perf_counter() - t0
            for k in map(int, a.k.split(",")):
                gm = GAPA(model, [a.layer], k=k, m=m, search=search)
                # reuse the fitted GP's conditioning set: only k differs
                state = base.state_dict()
                state["sites"] = {key: _with_k(site, k) for key, site in state["sites"].items()}
                gm.load_state_dict(state)
                site = next(iter(gm.sites.values()))
                gm(x)  # warm up
                site.timings.update(search=0.0, conditioning=0.0)
                total = best_of(lambda gm=gm: gm(x), a.repeats)
                reps = a.repeats
                s_ms = site.timings["search"] / reps * 1e3
                c_ms = site.timings["conditioning"] / reps * 1e3
                prop_ms = max(total * 1e3 - s_ms - c_ms, 0.0)
                print(f"| {m_str} | {k} | {search} | {total / plain:.1f}x | {s_ms:.1f} | {c_ms:.1f} "
                      f"| {prop_ms:.1f} | {fit_s:.1f} | {fit_s / train_pass:.1f}x |", flush=True)


def _with_k(site, k: int):
    from dataclasses import replace

    site.config = replace(site.config, k=k)
    return site


if __name__ == "__main__":
    main()
