"""Experiment: an RBF + linear kernel per unit, whose variance keeps growing under shift.

A GP activation's variance is bounded by its amplitude, while linearised Laplace's grows as the
inputs leave the training range. This script tests whether a linear term closes GAPA's NLL gap
to diagonal LLA on the time-ordered flights split. Each unit gets

    k(u, u') = a exp(-(u - u')^2 / (2 l^2)) + b (u - c)(u' - c),   b = beta * a / s^2,

with ``c`` and ``s^2`` the count-weighted mean and variance of the unit's inducing points (so the
linear term's prior variance equals ``a`` one standard deviation from the mean), conditioned on
the nearest inducing point (K = 1):

    var = a + b u~^2 - (a rho + b u~ x~)^2 / (a (1 + r) + b x~^2),   u~ = u - c, x~ = x - c.

The posterior mean is still the activation (the cached residuals are zero). ``beta = 0`` is
GAPA's own kernel. The variant is patched into :meth:`gapa.gp.site.GPSite.variance` for this
experiment only; it is not part of the library (see benchmarks/RESULTS.md for why).

Usage:
  python benchmarks/linear_kernel_experiment.py [--split time] [--seeds 0,1,2,3,4]
      [--betas 0,1,3,10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from gapa.gp import site
from gapa_bench.backbones import cached_regressor
from gapa_bench.data import load_flights
from gapa_bench.regression import fit_gapa, run_method

_plain_variance = site.GPSite.variance


def linear_rbf_variance(beta: float):
    """``GPSite.variance`` with the RBF + linear kernel above (K = 1 sites only)."""

    def variance(self: site.GPSite, z: torch.Tensor) -> torch.Tensor:
        if beta == 0.0:
            return _plain_variance(self, z)
        w = self.counts.to(self.rows.dtype)[:, None]
        c = (w * self.rows).sum(0) / w.sum()
        s2 = ((w * (self.rows - c).square()).sum(0) / w.sum()).clamp_min(1e-12)
        hp = self.hyperparameters
        idx = self._neighbours(z, 1)[:, 0]
        x, r = self.rows[idx], self.row_noise[idx, None]
        a, b = hp.amplitude, beta * hp.amplitude / s2
        u, xc = z - c, x - c
        rho = torch.exp(-0.5 * ((z - x) / hp.lengthscale).square())
        var = a + b * u * u - (a * rho + b * u * xc).square() / (a * (1 + r) + b * xc * xc)
        return var.clamp_min(0.0)

    return variance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--split", default="time", choices=["time", "shuffled"])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--betas", default="0,1,3,10")
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(1)
    data = load_flights(split=a.split)
    records = []
    for seed in (int(s) for s in a.seeds.split(",")):
        backbone = cached_regressor(data, seed=seed, progress=False)[0]
        for beta in (float(b) for b in a.betas.split(",")):
            site.GPSite.variance = linear_rbf_variance(beta)
            fit = partial(fit_gapa, layers=["3"], k=1, m=512, propagation="jacobian")
            r = run_method("gapa", fit, backbone, data, seed=seed)
            rec = {"split": a.split, "seed": seed, "beta": beta,
                   "val_nll": r.fitted.handle.calibration.nll,
                   "lengthscale_factor": r.info["lengthscale_factor"],
                   **{k: getattr(r, k) for k in ("nll", "crps", "cqm", "scale")}}
            records.append(rec)
            print(json.dumps(rec), flush=True)
    site.GPSite.variance = _plain_variance
    if a.out:
        with open(a.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
