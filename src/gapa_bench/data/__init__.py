"""Data sets: regression tables split and standardised the same way for every benchmark, and
the image sets of the classification benchmark (Fashion-MNIST, MNIST, rotations)."""

from __future__ import annotations

from .flights import FLIGHTS_FEATURES, flights_frame, load_flights
from .images import (
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    ROTATION_ANGLES,
    ImageData,
    load_fashion_mnist,
    load_mnist,
    rotated,
)
from .published import (
    AIRLINE_FEATURES,
    DATASETS,
    TAXI_FEATURES,
    YEAR_FEATURES,
    load_airline,
    load_dataset,
    load_taxi,
    load_year,
)
from .regression import (
    RegressionData,
    from_arrays,
    from_frame,
    hhmm_to_minutes,
    load_csv,
    split_sizes,
)

__all__ = [
    "AIRLINE_FEATURES",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FLIGHTS_FEATURES",
    "MNIST_CLASSES",
    "ROTATION_ANGLES",
    "TAXI_FEATURES",
    "YEAR_FEATURES",
    "ImageData",
    "RegressionData",
    "flights_frame",
    "from_arrays",
    "from_frame",
    "hhmm_to_minutes",
    "load_airline",
    "load_csv",
    "load_dataset",
    "load_fashion_mnist",
    "load_flights",
    "load_mnist",
    "load_taxi",
    "load_year",
    "rotated",
    "split_sizes",
]
