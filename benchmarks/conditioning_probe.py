"""What conditioning on the training activations does to GAPA's variance on flights (issue 16).

    python benchmarks/conditioning_probe.py --split time --seed 0 --out FILE.json
    python benchmarks/conditioning_probe.py --lengthscale-rule marginal_likelihood \
        --amplitude-rule marginal_likelihood --out FILE.json   # the GP's own hyperparameters

For the benchmark's chosen site (the middle tanh, M inducing points, K = 1) and every lengthscale
factor of the benchmark's candidate set: the share of validation and test queries whose GP
variance at the site is below half (and below 90%) of the prior amplitude, averaged over units,
and the validation NLL after the common calibration, beside the no-conditioning control's. Test
numbers are printed last and choose nothing. It answers where gapa - gapa_prior comes from: a
variance at the prior everywhere means conditioning cannot change the prediction.
"""

from __future__ import annotations

import argparse
import json

import torch

from gapa import GAPA
from gapa.predictive.regression import fit_scale_and_noise
from gapa_bench.backbones import cached_regressor
from gapa_bench.bench import GAPA_FIXED, LENGTHSCALE_CANDIDATES
from gapa_bench.data import load_flights
from gapa_bench.provenance import run_info


def nll(gm: GAPA, x: torch.Tensor, y: torch.Tensor, cal=None):
    """Mean NLL (standardised units) after the common calibration, fitted here unless given."""
    out = gm(x)
    cal = cal or fit_scale_and_noise(out.mean, out.var, y)
    var = cal.predictive_var(out.var)
    return float((0.5 * (torch.log(2 * torch.pi * var) + (y - out.mean) ** 2 / var)).mean()), cal


def below(gm: GAPA, key: str, z: torch.Tensor) -> dict[str, float]:
    """Share of (query, unit) pairs whose site variance is below 50% / 90% of the amplitude."""
    ratio = gm.site_variance(key, z) / gm.sites[key].hyperparameters.amplitude
    return {"below_50": float((ratio < 0.5).double().mean()),
            "below_90": float((ratio < 0.9).double().mean()),
            "mean_ratio": float(ratio.double().mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", default="time", choices=["time", "shuffled"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", default="3")
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--lengthscale-rule", default="quantile",
                   choices=["quantile", "marginal_likelihood"])
    p.add_argument("--amplitude-rule", default="max1",
                   choices=["max1", "variance", "unit", "marginal_likelihood"])
    p.add_argument("--out")
    a = p.parse_args()
    run = run_info()  # the code that runs, not the code at the end of the run
    data = load_flights(split=a.split, seed=a.seed)
    model = cached_regressor(data, seed=a.seed, progress=False)[0]
    prefix = model[: int(a.layer)]  # the layers before the activation: its pre-activation
    with torch.no_grad():
        z_val, z_test = prefix(data.x_val), prefix(data.x_test)
    rules = {"lengthscale_rule": a.lengthscale_rule, "amplitude_rule": a.amplitude_rule}
    options = {**GAPA_FIXED, "layers": [a.layer], "m": a.m, **rules}
    prior = GAPA(model, seed=a.seed, conditioning="prior", **options).fit(data.x_train)
    prior_val, prior_cal = nll(prior, data.x_val, data.y_val)
    prior_test, _ = nll(prior, data.x_test, data.y_test, prior_cal)
    gm = GAPA(model, seed=a.seed, **options).fit(data.x_train)
    (key,) = gm.sites
    rows = []
    print(f"flights {a.split}, seed {a.seed}, layer {a.layer}, M {a.m}, {rules}; prior-only control: "
          f"val NLL {prior_val:.4f}")
    print(f"{'factor':>9s} {'val<50%':>8s} {'val<90%':>8s} {'val NLL':>8s} {'- prior':>8s} | "
          f"{'test<50%':>8s} {'test NLL - prior':>16s}")
    for factor in LENGTHSCALE_CANDIDATES:
        gm.lengthscale_factor = factor
        val_nll, cal = nll(gm, data.x_val, data.y_val)
        test_nll, _ = nll(gm, data.x_test, data.y_test, cal)
        row = {"factor": factor, "val": below(gm, key, z_val), "test": below(gm, key, z_test),
               "val_nll": val_nll, "val_nll_minus_prior": val_nll - prior_val,
               "test_nll_minus_prior": test_nll - prior_test}
        rows.append(row)
        print(f"{factor:9.5f} {row['val']['below_50']:8.3f} {row['val']['below_90']:8.3f} "
              f"{val_nll:8.4f} {val_nll - prior_val:+8.4f} | {row['test']['below_50']:8.3f} "
              f"{test_nll - prior_test:+16.4f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"split": a.split, "seed": a.seed, "layer": a.layer, "m": a.m, **rules,
                       "prior_val_nll": prior_val, "rows": rows, "run": run}, f, indent=1)


if __name__ == "__main__":
    main()
