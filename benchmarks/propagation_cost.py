"""GAPA forward time over the plain forward for the small ResNet on 28x28 inputs, for a GPT-2
block (GPT-2 small's width, 768), and for the regression benchmark's MLP (3 x 200 tanh, 8
features) with both propagations, at batch sizes 1 and 256, with GAPA's default settings
(``layers="auto"``, K=1, M=512). Weights are random: the cost does not depend on them.

Usage: python benchmarks/propagation_cost.py [--batches 1,256] [--repeats 5] [--tokens 32]
       [--cases resnet,gpt2,mlp]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from _common import best_of, header
from gapa import GAPA
from gapa_bench.architectures import SmallResNet


def resnet_case(n_fit: int) -> tuple[torch.nn.Module, torch.Tensor, callable]:
    torch.manual_seed(0)
    model = SmallResNet().eval()
    return model, torch.rand(n_fit, 1, 28, 28), lambda b: torch.rand(b, 1, 28, 28)


def gpt2_block_case(n_fit: int, tokens: int):
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    torch.manual_seed(0)
    config = GPT2Config(n_embd=768, n_head=12, attn_implementation="sdpa")
    block = GPT2Block(config).eval()
    return block, torch.randn(n_fit, tokens, 768), lambda b: torch.randn(b, tokens, 768)


def mlp_case(n_fit: int):
    torch.manual_seed(0)
    widths = [8, 200, 200, 200, 1]
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1]).eval()
    return model, torch.randn(n_fit, 8), lambda b: torch.randn(b, 8)


def measure(name: str, model, fit_x, make_x, batches, repeats: int,
            propagation: str = "diagonal") -> list[str]:
    t0 = time.perf_counter()
    gm = GAPA(model, propagation=propagation).fit(fit_x, progress=False)
    fit_s = time.perf_counter() - t0
    rows = []
    for b in batches:
        x = make_x(b)
        with torch.no_grad():
            plain = best_of(lambda x=x: model(x), repeats)
        gapa_s = best_of(lambda x=x: gm(x), repeats)
        rows.append(f"| {name} | {gm.layers[0]} | {b} | {plain * 1e3:.2f} | {gapa_s * 1e3:.2f} | "
                    f"{gapa_s / plain:.2f}x | {fit_s:.1f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", default="1,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--fit-rows", type=int, default=2048)
    p.add_argument("--cases", default="resnet,gpt2,mlp")
    a = p.parse_args()
    cases = a.cases.split(",")
    batches = [int(b) for b in a.batches.split(",")]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(header())
    print("| model | GAPA layer | batch | plain ms | GAPA ms | GAPA / plain | fit s |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    if "resnet" in cases:
        rows += measure("SmallResNet 28x28", *resnet_case(a.fit_rows), batches, a.repeats)
    if "gpt2" in cases:
        fit_seqs = max(1, a.fit_rows // a.tokens)
        rows += measure(f"GPT-2 block, {a.tokens} tokens", *gpt2_block_case(fit_seqs, a.tokens),
                        batches, a.repeats)
    if "mlp" in cases:
        for propagation in ("diagonal", "jacobian"):
            rows += measure(f"MLP 3x200 tanh ({propagation})", *mlp_case(a.fit_rows), batches,
                            a.repeats, propagation)
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
