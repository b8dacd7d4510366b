"""Train (or find in the cache) every network `gapa-bench classification` loads, ahead of it.

    python benchmarks/train_classifiers.py --backbone resnet --seeds 3 --device cuda --shard 0/4

Writes the same cache files the benchmark reads (``$GAPA_CACHE_DIR/classifiers``): the key
hashes the data and the settings, not the device, so networks trained on a GPU serve a CPU
benchmark. Shards split the list so that several processes can share one GPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from gapa_bench.classifiers import ARCHITECTURES, accuracy, cached_classifier, networks_needed
from gapa_bench.data.images import load_fashion_mnist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", choices=ARCHITECTURES, default="mlp")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default="map,ensemble,mc_dropout")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shard", default="0/1", help="i/n: train every n-th network from the i-th")
    p.add_argument("--data-path", help="folder of the Fashion-MNIST IDX files")
    args = p.parse_args()
    i, n = (int(v) for v in args.shard.split("/"))
    data = load_fashion_mnist(args.data_path)
    jobs = networks_needed(args.methods.split(","), args.seeds)[i::n]
    for kw in jobs:
        t0 = time.perf_counter()
        model, path, trained = cached_classifier(data, args.backbone, device=args.device,
                                                 progress=False, **kw)
        print(f"{args.backbone} {kw}: test accuracy {accuracy(model, data.x_test, data.y_test):.4f}"
              f", {'trained' if trained else 'cached'} in {time.perf_counter() - t0:.1f} s "
              f"-> {path.name}", flush=True)


if __name__ == "__main__":
    main()
