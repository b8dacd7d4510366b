"""RQ5: how far is diagonal moment propagation from Monte Carlo through whole networks, and
which operation loses the correlation?

For each network GAPA is fitted with its defaults; then ``GAPA.trace`` (closed form) and
``gapa.reference.monte_carlo_trace`` (every GP activation sampled from its marginal, the rest of
the network run unchanged) give the variance of every module's output. The table reports the
ratio closed form / Monte Carlo at the output (median and 5-95% range over outputs) and the
first module after the GAPA layer whose median ratio leaves [0.9, 1.1], i.e. where the diagonal
rule starts to drop correlations.

Usage: python benchmarks/rq5_propagation.py [--samples 2000] [--queries 32]
"""

from __future__ import annotations

import argparse

import torch

from _common import header
from gapa import GAPA
from gapa.reference import monte_carlo_trace
from gapa_bench.architectures import SmallResNet
from gapa_bench.backbones import cached_regressor
from gapa_bench.data import load_flights


def flights_mlp():
    data = load_flights()
    model, _, _ = cached_regressor(data, progress=False)
    return model.double(), data.x_train.double(), data.x_test[:4096].double(), ["3"]


def small_resnet():
    torch.manual_seed(0)
    model = SmallResNet().double()
    model.train()
    with torch.no_grad():  # batch-norm statistics of a random batch, as training would set
        model(torch.rand(256, 1, 28, 28, dtype=torch.float64))
    model.eval()
    x = torch.rand(2048, 1, 28, 28, dtype=torch.float64)
    return model, x, torch.rand(256, 1, 28, 28, dtype=torch.float64), "auto"


def gpt2_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=500, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(500, (256, 16))
    return model, ids, torch.randint(500, (64, 16)), "auto"


def ratios(closed: torch.Tensor, mc: torch.Tensor) -> torch.Tensor:
    keep = mc > 1e-30
    return (closed[keep] / mc[keep]).flatten()


def study(name: str, model, x_fit, x_query, layers, samples: int, queries: int, gen) -> str:
    gm = GAPA(model, layers).fit(x_fit, progress=False)
    q = x_query[:queries]
    closed = gm.trace(q)
    mc = monte_carlo_trace(gm, q, samples, generator=gen)
    site = gm.layers[0]
    keys = [k for k in closed if k in mc]
    first_off, seen_site = "none", False
    for key in keys:
        seen_site |= key == site
        if not seen_site or key == site or not closed[key].var.any():
            continue
        r = ratios(closed[key].var, mc[key].var)
        if r.numel() and not 0.9 <= float(r.median()) <= 1.1:
            kind = type(model.get_submodule(key.split("#")[0])).__name__ if key else "model"
            first_off = f"{key or '(output)'} ({kind}), median {float(r.median()):.2f}"
            break
    r = ratios(closed[""].var, mc[""].var)
    lo, med, hi = (float(r.quantile(p)) for p in (0.05, 0.5, 0.95))
    return (f"| {name} | {site} | {med:.2f} | {lo:.2f} – {hi:.2f} | {first_off} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--queries", type=int, default=32)
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(header(f"float64, {a.samples} Monte-Carlo samples"))
    print("| network | GAPA layer | output ratio median | 5–95% | first module off by >10% |")
    print("|---|---|---|---|---|")
    cases = {"flights MLP (trained)": flights_mlp, "SmallResNet (random)": small_resnet,
             "GPT-2 LM, 2 blocks (random)": gpt2_lm}
    for name, make in cases.items():
        print(study(name, *make(), a.samples, a.queries, gen), flush=True)


if __name__ == "__main__":
    main()
