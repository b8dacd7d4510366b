"""Train (or find in the cache) every network `gapa-bench regression` loads on flights, ahead of it.

    python benchmarks/train_regressors.py --splits time,shuffled --seeds 5
    python benchmarks/train_regressors.py --splits shuffled --seeds 3,4   # a second process

The MAP backbone of each seed, the other ensemble members and one MC-dropout network per
candidate rate (:data:`gapa_bench.baselines.dropout.DROPOUT_RATES`); with ``--split shuffled``
seed ``s`` trains on shuffle ``s``, as the benchmark does. Writes the cache files the benchmark
reads (``$GAPA_CACHE_DIR/backbones``), so the benchmark's own run only scores.
"""

from __future__ import annotations

import argparse
import time

from gapa_bench.backbones import cached_regressor
from gapa_bench.baselines.dropout import DROPOUT_RATES
from gapa_bench.baselines.ensemble import member_seeds
from gapa_bench.bench import seed_list
from gapa_bench.cli import seeds_arg
from gapa_bench.data import load_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--splits", default="time,shuffled")
    p.add_argument("--seeds", type=seeds_arg, default=5,
                   help="N for seeds 0..N-1, or a comma-separated list such as 3,4")
    p.add_argument("--members", type=int, default=5)
    args = p.parse_args()
    for split in args.splits.split(","):
        for seed in seed_list(args.seeds):
            data = load_dataset("flights", None, split=split, seed=seed)
            jobs = [{"seed": s} for s in member_seeds(seed, args.members)]
            jobs += [{"seed": seed, "dropout": rate} for rate in DROPOUT_RATES]
            for kw in jobs:
                t0 = time.perf_counter()
                _, path, trained = cached_regressor(data, progress=False, **kw)
                print(f"{split} {kw}: {'trained' if trained else 'cached'} in "
                      f"{time.perf_counter() - t0:.1f} s -> {path.name}", flush=True)


if __name__ == "__main__":
    main()
