"""Slow references for the closed-form paths: Monte-Carlo propagation through the network."""

from __future__ import annotations

import torch

from .core import GAPA
from .moments import Moments


def monte_carlo_moments(
    gm: GAPA, x: torch.Tensor, n_samples: int, *, generator: torch.Generator
) -> Moments:
    """Output moments when every GAPA activation is *sampled* from its GP marginal.

    Each of the ``n_samples`` passes draws ``h = phi(z) + sqrt(v(z)) * eps`` independently per
    unit at every GAPA call site, ``z`` being that pass's own (already perturbed) pre-activation,
    and runs the rest of the network unchanged. The closed form of ``gm(x)`` must agree with these
    moments when variances are small (it is first order in them).
    """
    gm._require_fitted("sample")
    reps = x.repeat_interleave(n_samples, dim=0) if x.shape[0] else x
    z_seen: dict[str, torch.Tensor] = {}

    def on_call(key: str, z: torch.Tensor) -> None:
        z_seen[key] = z.detach().clone()

    def on_output(key: str, out: torch.Tensor) -> torch.Tensor:
        z = z_seen.pop(key)
        var = gm.sites[key].variance(z)
        eps = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
        return out + var.sqrt() * eps

    with torch.no_grad(), gm._call_sites(on_call, on_output):
        y = gm.model(reps)
    y = y.reshape(x.shape[0], n_samples, *y.shape[1:])
    return Moments(y.mean(1), y.var(1))
