"""Cost of the validation calibration (`gapa.predictive.regression.fit_scale_and_noise`) against the nested
search it replaced (kept as `_fit_scale_and_noise_reference`), on real and synthetic inputs.

Cases: GAPA's validation moments on flights (time split, seed-0 backbone, 54,771 rows: the
fit every ``gm.calibrate`` repeats per lengthscale factor) and a synthetic heavy-tailed case of
the same size (Student-t residuals, a few extreme ones). Prints the best of several calls for
each, the speed-up and the NLL difference (negative: the fast fit found a lower NLL).

Usage: python benchmarks/calibration_cost.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gapa import GAPA
from gapa.predictive.regression import _fit_scale_and_noise_reference, fit_scale_and_noise
from gapa_bench.backbones import cached_regressor
from gapa_bench.data import load_flights


def flights_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_flights(split="time")
    backbone = cached_regressor(data, seed=0, progress=False)[0]
    gm = GAPA(backbone, layers=["3"], k=1, m=512, propagation="jacobian").fit(
        data.x_train, progress=False)
    out = gm(data.x_val)
    return out.mean, out.var, data.y_val


def heavy_tailed_case(n: int = 54_771) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(0)
    mean = g.normal(size=n) * 10.0
    var = g.gamma(1.5, 20.0, n)
    e = g.standard_t(2.5, n)
    e[g.choice(n, 30, replace=False)] *= 40.0
    y = mean + np.sqrt(1.3 * var + 25.0) * e
    return tuple(torch.from_numpy(a) for a in (mean, var, y))


def best_time(fit, case, repeats: int):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cal = fit(*case)
        times.append(time.perf_counter() - t0)
    return min(times), cal


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    print("| case | rows | nested s | fast s | speed-up | NLL fast - nested | scale | noise |")
    print("|---|---|---|---|---|---|---|---|")
    for name, case in (("flights GAPA validation", flights_case()),
                       ("synthetic heavy-tailed", heavy_tailed_case())):
        slow_s, slow = best_time(_fit_scale_and_noise_reference, case, a.repeats)
        fast_s, fast = best_time(fit_scale_and_noise, case, a.repeats)
        print(f"| {name} | {case[0].numel():,} | {slow_s:.3f} | {fast_s:.4f} | "
              f"{slow_s / fast_s:.0f}x | {fast.nll - slow.nll:.1e} | {fast.scale:.6g} | "
              f"{fast.noise:.6g} |", flush=True)


if __name__ == "__main__":
    main()
