"""Issue 17's speed targets on SmolLM2-135M: ``gm(x)`` against the plain forward (batch 8 x 128,
one process) with GAPA at the last block and at block 2, and the fit against one inference pass
over the same tokens. Beside each, the floor of a diagonal propagation from that block: the
plain forward plus one product with the squared weight per linear layer after it. Best of ``--repeats`` calls each, plain and GAPA interleaved in the same
process.

Usage: python benchmarks/lm_speed.py [--repeats 3] [--fit-sequences 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from _common import best_of, header
from gapa import GAPA
from gapa.io import atomic_path
from gapa_bench.language import smollm2
from gapa_bench.lm_bench import act_site, austen_chunks
from gapa_bench.provenance import run_info


def linear_floor(model, x: torch.Tensor, block: int, repeats: int) -> float:
    """The plain forward plus, for every linear layer that GAPA at ``block`` makes uncertain, one
    more product with its squared weight (squared beforehand): what any diagonal propagation
    must at least do, since ``Var(W x) = (W * W) Var(x)`` for independent units."""
    hooks, squares = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        part = name.split(".")
        downstream = (name == "lm_head" or (part[:2] == ["model", "layers"] and (
            int(part[2]) > block or (int(part[2]) == block and part[-1] == "down_proj"))))
        if downstream:
            squares[module] = module.weight.detach().square()
            hooks.append(module.register_forward_hook(
                lambda mod, args, out: torch.nn.functional.linear(args[0], squares[mod])))
    try:
        with torch.no_grad():
            return best_of(lambda: model(x), repeats)
    finally:
        for h in hooks:
            h.remove()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="29,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fit-sequences", type=int, default=64)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args()
    run = run_info(sys.argv)  # the code that runs, not the code at the end of the run
    print(header("SmolLM2-135M, batch 8 x 128"))
    model, tok = smollm2()
    fit, held = austen_chunks(tok, 128)
    fit, x = fit[: args.fit_sequences], held[:8]

    def plain(ids):
        with torch.no_grad():
            return model(ids).logits

    rows = []
    for block in (int(b) for b in args.blocks.split(",")):
        floor = linear_floor(model, x, block, args.repeats)
        t0 = time.perf_counter()
        gm = GAPA(model, layers=[act_site(block)]).fit(fit)
        fit_seconds = time.perf_counter() - t0
        inference = best_of(lambda: [plain(fit[i:i + 8]) for i in range(0, len(fit), 8)], 1)
        base = best_of(lambda: plain(x), args.repeats)
        ours = best_of(lambda gm=gm: gm(x), args.repeats)
        row = {"block": block, "plain_seconds": base, "gapa_seconds": ours,
               "ratio": ours / base, "floor_seconds": floor, "floor_ratio": floor / base,
               "fit_seconds": fit_seconds,
               "fit_inference_seconds": inference, "fit_ratio": fit_seconds / inference,
               "fit_tokens": fit.numel()}
        rows.append(row)
        print(f"block {block:>2}: gm(x) {ours:.3f} s, plain {base:.3f} s, ratio {ours / base:.2f} "
              f"(floor {floor / base:.2f}); "
              f"fit {fit_seconds:.1f} s, one inference pass over its {fit.numel()} tokens "
              f"{inference:.1f} s, ratio {fit_seconds / inference:.2f}", flush=True)
    if args.json_path:
        record = {"kind": "lm_speed", "model": "SmolLM2-135M", "batch": [8, 128], "rows": rows,
                  "threads": torch.get_num_threads(), "run": run}
        with atomic_path(args.json_path) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
