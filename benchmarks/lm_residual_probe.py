"""Where the diagonal rule's excess over Monte Carlo arises in SmolLM2-135M, block by block.

GAPA on the MLP activation of one block (``--block``, default 5), fitted on 32 Austen
sequences of 64 tokens; one held-out sequence traced by the diagonal rule (``gm.trace``) and by
Monte Carlo through the same network (``gapa.reference.monte_carlo_trace``). For every later
block: the median over units and tokens of diagonal / Monte-Carlo variance at the outputs of the
input norm, the value projection, the attention's output projection, the MLP's activation and
up projection, the MLP's output (its down projection) and the block's output (the residual
stream); and at the logits. The reading side of a block (norm, projections of the normalised
token) keeps the ratio it receives; where it rises shows which operations lose correlations.

Usage: python benchmarks/lm_residual_probe.py [--block 5] [--samples 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _common import header
from gapa import GAPA
from gapa.io import atomic_path
from gapa.reference import monte_carlo_trace
from gapa_bench.language import smollm2
from gapa_bench.lm_bench import act_site, austen_chunks
from gapa_bench.provenance import run_info

#: The modules of each block whose outputs are compared, by their names inside the block.
PARTS = ("input_layernorm", "self_attn.v_proj", "self_attn.o_proj", "mlp.act_fn", "mlp.up_proj",
         "mlp", "")


def median_ratio(diag: torch.Tensor, mc: torch.Tensor) -> float:
    return float((diag.double() / mc.double()).flatten().median())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args()
    torch.set_num_threads(1)
    run = run_info(sys.argv)
    print(header(f"SmolLM2-135M, GAPA at block {args.block}"))
    model, tok = smollm2()
    fit, held = austen_chunks(tok, 64)
    gm = GAPA(model, layers=[act_site(args.block)]).fit(fit[:32], progress=False)
    x = held[:1]
    with torch.no_grad():
        diag = gm.trace(x)
        mc = monte_carlo_trace(gm, x, args.samples, generator=torch.Generator().manual_seed(0))
    rows = []
    for block in range(args.block + 1, len(model.model.layers)):
        names = {part: f"model.layers.{block}" + (f".{part}" if part else "") for part in PARTS}
        row = {"block": block, **{part or "residual": median_ratio(diag[n].var, mc[n].var)
                                  for part, n in names.items()}}
        rows.append(row)
        print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row.items()), flush=True)
    logits = median_ratio(diag["lm_head"].var, mc["lm_head"].var)
    print(f"logits {logits:.2f}")
    if args.json_path:
        record = {"kind": "lm_residual_probe", "model": "SmolLM2-135M", "gapa_block": args.block,
                  "samples": args.samples, "tokens": x.shape[1], "rows": rows, "logits": logits,
                  "threads": 1, "run": run}
        with atomic_path(args.json_path) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
