"""Cost of following writes: a (64, T, 256) buffer filled one step at a time
(``buf[:, i] = h * (i + 1)``, an RNN's output loop) against the same values built by
``torch.stack``, both through :func:`gapa.propagate`. The write rules update a variance in place
while nothing else holds it, so the loop should cost what the stack costs, linear in T.

Usage: python benchmarks/write_cost.py [--steps 128,256,512] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from _common import best_of, header
from gapa.propagation import propagate


class Loop(nn.Module):
    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def forward(self, h):
        buf = h.new_zeros(h.shape[0], self.steps, h.shape[1])
        for i in range(self.steps):
            buf[:, i] = h * (i + 1)
        return buf


class Stack(Loop):
    def forward(self, h):
        return torch.stack([h * (i + 1) for i in range(self.steps)], 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", default="128,256,512")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(header())
    print("| T | loop s | stack s | loop / stack |")
    print("|---|---|---|---|")
    h, v = torch.randn(64, 256), torch.rand(64, 256)
    for steps in map(int, a.steps.split(",")):
        loop = best_of(lambda s=steps: propagate(Loop(s), h, v), a.repeats)
        stack = best_of(lambda s=steps: propagate(Stack(s), h, v), a.repeats)
        print(f"| {steps} | {loop:.3f} | {stack:.3f} | {loop / stack:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
