"""Issue 17: is diagonal propagation finite and near Monte Carlo from every block of SmolLM2?

GAPA goes on the MLP activation of one block at a time (default blocks 0, 2, 5, 10, 15, 20, 25,
29), fitted on Austen. For held-out Austen sequences the logit variance of ``gm(x)`` (diagonal
rules) is compared with :func:`gapa.reference.monte_carlo_moments` (each GP activation sampled
from its marginal, the rest of the network run unchanged). Printed per block: whether every
value is finite, and the ratio diagonal / Monte Carlo per logit and per token (summed over the
vocabulary): median and 5-95% range. The relative standard error of a Monte-Carlo variance
from ``S`` samples is ``sqrt(2 / S)`` per logit (12.5% at 128).

Usage: python benchmarks/lm_propagation.py [--blocks 0,2,5] [--samples 128] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from _common import header
from gapa import GAPA
from gapa.errors import NonFiniteError
from gapa.io import atomic_path
from gapa.reference import monte_carlo_moments
from gapa_bench.language import smollm2
from gapa_bench.lm_bench import act_site, austen_chunks
from gapa_bench.provenance import run_info

QUANTILES = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)


def quantiles(x: torch.Tensor) -> list[float]:
    x = x.flatten().double()
    if x.numel() > 2**24:  # torch.quantile's limit; a strided subsample keeps every region
        x = x[:: x.numel() // 2**23 + 1]
    return [float(q) for q in torch.quantile(x, QUANTILES)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="0,2,5,10,15,20,25,29")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--fit-sequences", type=int, default=128)
    p.add_argument("--test-sequences", type=int, default=2)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args()
    run = run_info(sys.argv)  # the code that runs, not the code at the end of the run
    print(header("diagonal propagation against Monte Carlo through SmolLM2-135M"))
    model, tok = smollm2()
    fit, held = austen_chunks(tok, args.length)
    g = torch.Generator().manual_seed(0)
    fit = fit[torch.randperm(fit.shape[0], generator=g)[: args.fit_sequences]]
    test = held[: args.test_sequences]
    rows = []
    print(f"{'block':>5}  finite  {'per logit: 5%, median, 95%':>28}  {'per token':>24}")
    for block in (int(b) for b in args.blocks.split(",")):
        start = time.perf_counter()
        gm = GAPA(model, layers=[act_site(block)]).fit(fit)
        row = {"block": block, "layer": act_site(block)}
        try:
            var = gm(test).var
            row["finite"] = True
        except NonFiniteError as e:
            rows.append({**row, "finite": False, "error": str(e)})
            print(f"{block:>5}  no: {e}")
            continue
        g = torch.Generator().manual_seed(block)  # one sequence at a time bounds the memory
        mc = torch.cat([monte_carlo_moments(gm, row[None], args.samples, generator=g).var
                        for row in test])
        row["per_logit"] = quantiles(var / mc)
        row["per_token"] = quantiles(var.sum(-1) / mc.sum(-1))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        fmt = lambda q: f"{q[0]:7.2f} {q[1]:7.2f} {q[2]:7.2f}"  # noqa: E731
        print(f"{block:>5}  yes     {fmt(row['per_logit']):>28}  {fmt(row['per_token']):>24}",
              flush=True)
    if args.json_path:
        record = {"kind": "lm_propagation", "model": "SmolLM2-135M", "samples": args.samples,
                  "fit_sequences": args.fit_sequences, "test_sequences": args.test_sequences,
                  "length": args.length, "blocks": rows, "run": run}
        with atomic_path(args.json_path) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
