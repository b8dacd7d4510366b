"""Shared fixtures; shared models and tolerances are in helpers.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on two shared cores threads mostly contend (the
    classification and Laplace modules ran up to 20x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def train_x(gen) -> torch.Tensor:
    return torch.randn(300, 3, generator=gen)
