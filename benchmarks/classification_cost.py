"""Test-time cost of the classification methods over the plain network, in one process, on the
cached Fashion-MNIST backbones (seed 0): MAP, GAPA as the benchmark runs it, kNN and last-layer
Laplace, on the same test images, best of N. GAPA and kNN are fitted on a training subset (their
test cost depends on M and the feature size, not on the training-set size); last-layer Laplace
on the whole training set.

Usage: python benchmarks/classification_cost.py [--backbone resnet] [--rows 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import best_of, header
from gapa.errors import MissingDependencyError
from gapa_bench.classification_bench import METHODS
from gapa_bench.classifiers import ARCHITECTURES, cached_classifier
from gapa_bench.data.images import load_fashion_mnist, subset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", choices=ARCHITECTURES, default="resnet")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--fit-rows", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = load_fashion_mnist()
    model = cached_classifier(data, a.backbone, progress=False)[0]
    small = subset(data, a.fit_rows, a.rows, n_val=2000)
    x = small.x_test
    print(header(f"Fashion-MNIST {a.backbone}, {a.rows} test images, fit on {a.fit_rows}"))
    print("| method | fit s | test s | test / MAP |")
    print("|---|---|---|---|")
    base = None
    # MAP again last: the first timings of a process can include one-off set-up
    for name in ("map", "gapa", "knn", "lla_lastlayer", "map"):
        fit_data = data if name == "lla_lastlayer" else small
        t0 = time.perf_counter()
        try:
            fitted = METHODS[name](model, fit_data, seed=0, progress=False, train={})
        except MissingDependencyError as exc:
            print(f"| {name} | skipped: {exc} | | |")
            continue
        fit_s = time.perf_counter() - t0
        seconds = best_of(lambda f=fitted: _predict_and_score(f, x.clone()), a.repeats)
        base = base or seconds
        print(f"| {name} | {fit_s:.1f} | {seconds:.2f} | {seconds / base:.2f}x |", flush=True)


def _predict_and_score(fitted, x: torch.Tensor) -> None:
    """What the benchmark asks of a method per input: probabilities, and its epistemic OOD
    score if it has one (GAPA's comes from the same pass as its probabilities)."""
    fitted.predict(x)
    for score in fitted.ood_scores.values():
        score(x)


if __name__ == "__main__":
    main()
