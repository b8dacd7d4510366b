"""Property-based checks of the three conditioners (float64): bounds, permutation invariance,
variance at a cached row and monotonicity in the conditioning set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gapa.gp.conditioning import ExactConditioner, local_variance, nearest_variance
from gapa.gp.kernels import Hyperparameters
from gapa.gp.numerics import VARIANCE_FLOOR

#: Reproducible runs (the same examples every time) that leave no ``.hypothesis`` database.
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None)

# tiny matrices: a second intra-op thread only contends on the two shared cores
pytestmark = pytest.mark.usefixtures("one_thread")

#: Slack above the amplitude allowed by the bounds checks (relative).
TOP_SLACK = 1e-6
#: Tolerance of the invariance and monotonicity checks, relative to the amplitude (float64).
REL_TOL = 1e-9

_values = st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False, width=64)


def _array(shape) -> st.SearchStrategy[torch.Tensor]:
    return hnp.arrays(np.float64, shape, elements=_values).map(torch.from_numpy)


def _positive(lo: float, hi: float, n: int) -> st.SearchStrategy[torch.Tensor]:
    """``n`` values log-uniform in ``[lo, hi]``."""
    exps = st.floats(np.log10(lo), np.log10(hi), allow_nan=False, width=64)
    return st.lists(exps, min_size=n, max_size=n).map(
        lambda e: torch.tensor([10.0**v for v in e], dtype=torch.float64))


@st.composite
def problems(draw, k_min: int = 1, k_max: int = 6, r_min: float = 1e-6, r_max: float = 10.0):
    """Rows (N, d), per-row relative noise (N,), queries (B, d) and hyperparameters."""
    n = draw(st.integers(k_min, k_max))
    d = draw(st.integers(1, 3))
    b = draw(st.integers(1, 4))
    rows = draw(_array((n, d)))
    queries = draw(_array((b, d)))
    if draw(st.booleans()):  # some queries exactly at cached rows
        picks = draw(st.lists(st.integers(0, n - 1), min_size=b, max_size=b))
        queries = torch.where(torch.tensor(draw(st.lists(st.booleans(), min_size=b, max_size=b)))[:, None],
                              rows[picks], queries)
    r = draw(_positive(r_min, r_max, n))
    hp = Hyperparameters(
        lengthscale=draw(_positive(0.05, 20.0, d)),
        amplitude=draw(_positive(1e-3, 1e3, d)),
        noise=1e-2,  # not read by the conditioners: the per-row r carries the noise
    )
    return rows, r, queries, hp


def _assert_bounds(var: torch.Tensor, amp: torch.Tensor) -> None:
    assert var.dtype == torch.float64
    assert bool(torch.isfinite(var).all()), var
    assert bool((var >= VARIANCE_FLOOR * amp).all()), (var, amp)
    assert bool((var <= amp * (1 + TOP_SLACK)).all()), (var, amp)


# --- bounds ------------------------------------------------------------------------------------


@SETTINGS
@given(problems(), st.data())
def test_nearest_variance_is_bounded(problem, data):
    rows, r, queries, hp = problem
    idx = torch.tensor(data.draw(st.lists(st.integers(0, len(rows) - 1),
                                          min_size=len(queries), max_size=len(queries))))
    var = nearest_variance(queries, rows[idx], r[idx], hp)
    assert var.shape == queries.shape
    _assert_bounds(var, hp.amplitude)


@SETTINGS
@given(problems(k_min=2, k_max=5), st.data())
def test_local_variance_is_bounded(problem, data):
    rows, r, queries, hp = problem
    k = data.draw(st.integers(2, len(rows)))
    # each query gets its own K rows of the set, in any order
    idx = torch.stack([torch.tensor(data.draw(st.permutations(range(len(rows)))))[:k]
                       for _ in range(len(queries))])
    var = local_variance(queries, rows[idx], r[idx], hp)
    assert var.shape == queries.shape
    _assert_bounds(var, hp.amplitude)


@SETTINGS
@given(problems())
def test_exact_variance_is_bounded(problem):
    rows, r, queries, hp = problem
    var = ExactConditioner(rows, r, hp).variance(queries)
    assert var.shape == queries.shape
    _assert_bounds(var, hp.amplitude)


# --- invariances ---------------------------------------------------------------------------------


@SETTINGS
@given(problems(k_min=2, r_min=1e-4), st.data())
def test_exact_is_invariant_to_the_order_of_the_rows(problem, data):
    rows, r, queries, hp = problem
    perm = torch.tensor(data.draw(st.permutations(range(len(rows)))))
    var = ExactConditioner(rows, r, hp).variance(queries)
    permuted = ExactConditioner(rows[perm], r[perm], hp).variance(queries)
    torch.testing.assert_close(permuted, var, rtol=REL_TOL, atol=REL_TOL * float(hp.amplitude.max()))


@SETTINGS
@given(problems(k_min=2, k_max=5, r_min=1e-4), st.data())
def test_local_is_invariant_to_the_order_of_each_querys_neighbours(problem, data):
    rows, r, queries, hp = problem
    b, k = len(queries), len(rows)
    neighbours = rows.expand(b, k, rows.shape[1])
    noise = r.expand(b, k)
    # a different order of the K neighbours for every query, noise moved with its row
    perm = torch.stack([torch.tensor(data.draw(st.permutations(range(k)))) for _ in range(b)])
    var = local_variance(queries, neighbours, noise, hp)
    permuted = local_variance(queries, torch.gather(neighbours, 1, perm[..., None].expand_as(neighbours)),
                              torch.gather(noise, 1, perm), hp)
    torch.testing.assert_close(permuted, var, rtol=REL_TOL, atol=REL_TOL * float(hp.amplitude.max()))
    # and K neighbours given to local conditioning are the exact GP on those K rows
    exact = ExactConditioner(rows, r, hp).variance(queries)
    torch.testing.assert_close(var, exact, rtol=REL_TOL, atol=REL_TOL * float(hp.amplitude.max()))


# --- at a cached row, far away, and with more rows ----------------------------------------------------


@SETTINGS
@given(problems(r_min=1e-4), st.data())
def test_variance_at_a_cached_row_is_below_the_variance_far_away(problem, data):
    rows, r, _, hp = problem
    amp = hp.amplitude
    i = data.draw(st.integers(0, len(rows) - 1))
    at_row = rows[i : i + 1]
    # 50 lengthscales beyond every row in every unit: the kernel is exp(-1250) = 0
    far = rows.max(0).values + 50 * hp.lengthscale
    # conditioning on one row at it: the closed form a r / (1 + r) (computed as
    # a (1 - 1 / (1 + r)), which cancels: eps / r relative error)
    one = amp * r[i] / (1 + r[i])
    torch.testing.assert_close(nearest_variance(at_row, at_row, r[i : i + 1], hp)[0], one,
                               rtol=REL_TOL, atol=0)
    torch.testing.assert_close(nearest_variance(far[None], at_row, r[i : i + 1], hp)[0], amp,
                               rtol=1e-12, atol=0)
    exact = ExactConditioner(rows, r, hp)
    v_row = exact.variance(at_row)[0]
    v_far = exact.variance(far[None])[0]
    torch.testing.assert_close(v_far, amp, rtol=1e-12, atol=0)
    assert bool((v_row <= v_far).all())
    assert bool((v_row < amp).all())
    # the whole set knows at least as much at row i as row i alone
    assert bool((v_row <= one + REL_TOL * amp).all()), (v_row, one)


@SETTINGS
@given(problems(k_min=2, k_max=8, r_min=1e-4), st.data())
def test_more_rows_never_increase_the_exact_variance(problem, data):
    rows, r, queries, hp = problem
    amp = hp.amplitude
    # a chain of nested subsets: the first 1, 2, ..., N rows of a random order
    perm = torch.tensor(data.draw(st.permutations(range(len(rows)))))
    previous = amp.expand_as(queries)  # no rows: the prior
    for n in range(1, len(rows) + 1):
        sub = perm[:n]
        var = ExactConditioner(rows[sub], r[sub], hp).variance(queries)
        assert bool((var <= previous + REL_TOL * amp).all()), (n, var - previous)
        previous = var
