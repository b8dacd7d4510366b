"""Choices made on validation data: the lengthscale factors a calibration tries."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

from ..errors import ConfigurationError


def parse_lengthscale_factors(values: Iterable, what: str) -> list[float]:
    """Return positive finite numbers (Python, numpy or one-element tensors) as floats.

    Raises a ConfigurationError naming the bad ones.
    """
    try:
        values = list(values)
    except TypeError:
        raise ConfigurationError(f"{what} must be a sequence of numbers, got "
                                 f"{type(values).__name__}") from None
    factors, bad = [], []
    for v in values:
        number = (isinstance(v, numbers.Real) and not isinstance(v, bool)) or (
            isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point())
        f = float(v) if number else math.nan
        (factors if math.isfinite(f) and f > 0 else bad).append(f if number else v)
    if bad:
        raise ConfigurationError(f"{what} must be positive finite numbers, got {bad}")
    return factors
