"""Numerical safety: Cholesky with bounded jitter, the variance clamp, and degenerate caches."""

from __future__ import annotations

import warnings

import pytest
import torch

import gapa
from gapa.gp.numerics import (
    JITTER_START,
    VARIANCE_FLOOR,
    JitterWarning,
    clamp_variance,
    safe_cholesky,
)
from helpers import mlp

DTYPES = [torch.float32, torch.float64]


def _pd_batch(gen, b: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    a = torch.randn(b, n, n, generator=gen, dtype=torch.float64)
    return (a @ a.mT + 0.1 * torch.eye(n, dtype=torch.float64)).to(dtype)


# --- safe_cholesky -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_cholesky_of_pd_batch_equals_torch_without_warning(gen, dtype):
    a = _pd_batch(gen, 5, 6, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any JitterWarning fails the test
        chol = safe_cholesky(a)
    assert torch.equal(chol, torch.linalg.cholesky(a))


@pytest.mark.parametrize("dtype", DTYPES)
def test_singular_entry_gets_jitter_and_only_it(gen, dtype):
    n, bad = 6, 2
    a = _pd_batch(gen, 4, n, dtype)
    a[bad] = torch.ones(n, n, dtype=dtype)  # rank 1: PSD but singular
    with pytest.warns(JitterWarning, match=r"failed for 1 of 4 matrices of size 6.*jitter") as rec:
        chol = safe_cholesky(a)
    assert all(issubclass(w.category, JitterWarning) for w in rec)
    good = [i for i in range(4) if i != bad]
    for i in good:  # untouched entries: bit for bit the plain factor
        assert torch.equal(chol[i], torch.linalg.cholesky(a[i]))
    # the repaired entry factorises a slightly jittered matrix, and is lower triangular
    assert bool(torch.isfinite(chol[bad]).all())
    assert torch.equal(chol[bad], chol[bad].tril())
    recon = chol[bad] @ chol[bad].mT
    first_eps = JITTER_START[dtype]
    torch.testing.assert_close(recon, a[bad], rtol=0, atol=1e3 * first_eps * n)


def test_negative_definite_raises_numerical_error_naming_the_jitter():
    a = -torch.eye(4, dtype=torch.float64).expand(2, 4, 4).clone()
    with pytest.warns(JitterWarning), pytest.raises(
        gapa.errors.NumericalError, match=r"failed for 2 matrices of size 4 even with jitter 1e-02"
    ) as info:
        safe_cholesky(a)
    assert isinstance(info.value, RuntimeError)


# --- clamp_variance ----------------------------------------------------------------------------


def test_clamp_variance_with_scalar_amplitude():
    var = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.0], dtype=torch.float64)
    out = clamp_variance(var, 2.0)
    expected = torch.tensor([VARIANCE_FLOOR * 2.0, VARIANCE_FLOOR * 2.0, 0.5, 2.0, 2.0],
                            dtype=torch.float64)
    assert torch.equal(out, expected)


def test_clamp_variance_per_unit_tensor_amplitude():
    amplitude = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    var = torch.tensor(
        [[-1e-3, 0.7, 5.0],  # negative, inside, above
         [0.6, -2.0, 3.0],  # above, negative, inside
         [0.25, 1.0, 4.0]],  # inside, at the amplitude, at the amplitude
        dtype=torch.float64,
    )
    out = clamp_variance(var, amplitude)
    floor = VARIANCE_FLOOR * amplitude
    expected = torch.tensor(
        [[floor[0], 0.7, 4.0],
         [0.5, floor[1], 3.0],
         [0.25, 1.0, 4.0]],
        dtype=torch.float64,
    )
    assert torch.equal(out, expected)
    assert bool((out >= floor).all()) and bool((out <= amplitude).all())


# --- degenerate caches: duplicated rows ---------------------------------------------------------


def _duplicated(gen, dtype):
    x = torch.randn(20, 3, generator=gen, dtype=dtype).repeat(3, 1)  # every row three times
    queries = torch.cat([x[:20], 2.0 * torch.randn(30, 3, generator=gen, dtype=dtype)])
    return mlp([3, 16, 16, 2]).to(dtype), x, queries


def _check_finite_moments(gm: gapa.GAPA, model, queries: torch.Tensor) -> None:
    out = gm(queries)
    assert bool(torch.isfinite(out.var).all())
    assert bool((out.var > 0).all())
    with torch.no_grad():
        assert torch.equal(out.mean, model(queries))
    for site in gm.sites.values():
        assert site.cache_size == 60 and site.n_conditioning == 60


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "options", [{"k": 8}, {"conditioning": "exact"}], ids=["local_k8", "exact"]
)
def test_duplicated_rows_give_finite_variances(gen, dtype, options):
    """With the default noise the Gram matrices of repeated rows stay positive definite: no
    jitter is needed (warnings are errors here, so a JitterWarning would fail the test)."""
    model, x, queries = _duplicated(gen, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", JitterWarning)
        gm = gapa.GAPA(model, layers=["1", "3"], m=None, **options).fit(x, progress=False)
        _check_finite_moments(gm, model, queries)


@pytest.mark.parametrize(
    "options", [{"k": 8}, {"conditioning": "exact"}], ids=["local_k8", "exact"]
)
def test_duplicated_rows_with_tiny_noise_need_jitter_and_stay_finite(gen, options):
    """float32 with noise 1e-9: the Gram matrices of repeated rows are singular in working
    precision, the jitter repairs them (with a warning: at fit for the exact conditioner, which
    factorises once, at predict for local conditioning) and the variances stay finite."""
    model, x, queries = _duplicated(gen, torch.float32)
    with pytest.warns(JitterWarning, match="retrying with jitter"):
        gm = gapa.GAPA(model, layers=["1", "3"], m=None, noise_ratio=1e-9, **options)
        gm.fit(x, progress=False)
        _check_finite_moments(gm, model, queries)
