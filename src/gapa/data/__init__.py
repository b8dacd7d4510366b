"""Regression data sets, split and standardised the same way for every benchmark."""

from __future__ import annotations

from .flights import FLIGHTS_FEATURES, flights_frame, load_flights
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
    "FLIGHTS_FEATURES",
    "TAXI_FEATURES",
    "YEAR_FEATURES",
    "RegressionData",
    "flights_frame",
    "from_arrays",
    "from_frame",
    "hhmm_to_minutes",
    "load_airline",
    "load_csv",
    "load_dataset",
    "load_flights",
    "load_taxi",
    "load_year",
    "split_sizes",
]
