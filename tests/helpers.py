"""Models and tolerances shared by the tests of both packages (fixtures live in conftest)."""

from __future__ import annotations

import itertools

import torch
from torch import nn

#: Tolerances used across the tests (float64 unless stated).
TOL = {
    "exact_vs_local": 1e-10,  # same linear algebra on the same rows
    "closed_form": 1e-12,  # K = 1 formula against the general path
    "mc_relative": 0.08,  # Monte Carlo with 10k samples: 5.6 standard errors of a variance
}


def mlp(widths: list[int], act: type[nn.Module] = nn.Tanh, seed: int = 0) -> nn.Sequential:
    """A small MLP with a fresh activation module after each hidden Linear."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=gen))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).eval()


class SharedActivation(nn.Module):
    """One activation module object called at two places in forward: two call sites."""

    def __init__(self, d_in: int = 3, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d_in, width)
        self.fc2 = nn.Linear(width, width)
        self.out = nn.Linear(width, 2)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


def assert_usage_error(main, argv: list[str], argument: str, prog: str, capsys) -> None:
    """``main(argv)`` ends in argparse's one-line error naming ``argument``, exit status 2,
    nothing on stdout and no traceback."""
    import pytest

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in captured.err
    assert errors[0].startswith(f"{prog} ") and f"error: argument {argument}" in errors[0]


def item_pool(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` item-like 28 x 28 images (a bright blob of random size on 0, so that the scenes'
    masks are non-trivial) and class labels 0-9: segmentation scenes without Fashion-MNIST."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    radius = 4 + 8 * torch.rand(n, 1, 1, generator=g)
    blob = ((yy - 14) ** 2 + (xx - 14) ** 2).sqrt() < radius
    return blob * (0.3 + 0.7 * torch.rand(n, 28, 28, generator=g)), torch.randint(10, (n,), generator=g)


def jacobian_by_rows(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full Jacobian ``(n, P)`` of a single-output ``net``, one reverse pass per row:
    independent of the vmap/jacrev paths the Laplace-type peers use."""
    params = list(net.parameters())
    rows = []
    for xi in x:
        grads = torch.autograd.grad(net(xi[None]).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)
