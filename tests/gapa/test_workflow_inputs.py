"""Workflow arguments a user gets wrong, or gets right in a less common dtype: each is a typed
error raised before anything changes, or works end to end.

K > 1 / exact conditioning of a half-precision network.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gapa

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(dtype: torch.dtype = torch.float32, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, classes)).to(dtype).eval()


def inputs(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [{"k": 4}, {"conditioning": "exact", "m": None},
                                     {"k": 4, "propagation": "jacobian"}])
def test_half_precision_conditions_on_several_rows(dtype, options, tmp_path):
    # torch has no half-precision Cholesky: the K x K (or exact) Gram matrices are factorised
    # in float32 and the variances given back in the model's dtype, close to a float32 fit's
    model = mlp(dtype)
    x = inputs(6, 2, dtype)
    gm = gapa.GAPA(model, **{"m": 16, **options}).fit(inputs(60, 0, dtype))
    out = gm(x)
    with torch.no_grad():
        assert torch.equal(out.mean, model(x))
    assert out.var.dtype == dtype and bool(torch.isfinite(out.var).all())
    reference = gapa.GAPA(mlp(), **{"m": 16, **options}).fit(inputs(60, 0))(x.float()).var
    assert torch.allclose(out.var.float(), reference, rtol=0.1, atol=1e-3)
    gm.calibrate(x, torch.randn(6, 3).to(dtype))
    loaded = gapa.GAPA.load(gm.save(tmp_path / "half.gapa"), model)
    assert torch.equal(loaded(x).var, gm(x).var)
