"""A standardised train/validation/test container and the helpers that build one.

Every loader in :mod:`gapa_bench.data` ends in :func:`from_arrays`, so all data sets share one
standardisation rule: statistics come from the training split only, so nothing about the
validation or test rows leaks into the inputs the network sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import DataError

__all__ = [
    "MIN_ROWS",
    "RegressionData",
    "from_arrays",
    "from_frame",
    "hhmm_to_minutes",
    "load_csv",
    "split_sizes",
]

MIN_ROWS = 10
"""Fewest rows (after dropping missing values) a data set may have."""

# A column whose training spread is below this, relative to its magnitude, counts as constant.
_CONSTANT_RTOL = 1e-10


@dataclass(frozen=True, eq=False, repr=False)
class RegressionData:
    """Standardised regression splits plus what is needed to undo the standardisation.

    ``x_*`` are float32 ``(n, d)`` and ``y_*`` float32 ``(n, 1)``; ``x = (raw - x_mean) / x_std``
    and ``y = (raw - y_mean) / y_std`` with statistics of the training split only.
    """

    name: str
    feature_names: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: float
    y_std: float
    split: str
    n_dropped: int = 0

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Rows in (train, validation, test)."""
        return (len(self.x_train), len(self.x_val), len(self.x_test))

    def to_target_units(
        self, mean: torch.Tensor | float, std: torch.Tensor | float
    ) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Map a predictive mean/std from standardised units back to the target's units."""
        return mean * self.y_std + self.y_mean, std * self.y_std

    def describe(self) -> str:
        n_train, n_val, n_test = self.sizes
        return (
            f"{self.name}: {self.n_features} features, train/val/test = "
            f"{n_train:,}/{n_val:,}/{n_test:,} rows ({self.split}), "
            f"{self.n_dropped:,} rows dropped"
        )

    def __repr__(self) -> str:  # the default would print every tensor
        return f"RegressionData({self.describe()})"


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Row counts for a (train, val, test) split of ``n`` rows; the test split takes the rest."""
    fr = _check_fractions(fractions)
    n_train = round(n * fr[0])
    n_val = round(n * fr[1])
    return n_train, n_val, n - n_train - n_val


def hhmm_to_minutes(values: pd.Series | np.ndarray, *, column: str, source: str) -> np.ndarray:
    """Clock times written as hhmm (e.g. 1530) to minutes after midnight (930); 2400 -> 0.

    Raises DataError when the values cannot be hhmm, e.g. because the file already holds minutes.
    """
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    bad = (finite < 0) | (finite > 2400) | (finite % 100 >= 60) | (finite != np.floor(finite))
    if bad.any():
        raise DataError(
            f"{source}: column {column!r} should hold clock times as hhmm (0-2400), but "
            f"{int(bad.sum())} values are not, e.g. {finite[bad][0]:g}. "
            "Pass the original file, whose times are not yet converted to minutes."
        )
    return ((v // 100) * 60 + v % 100) % 1440


def from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    name: str,
    feature_names: Sequence[str],
    sizes: tuple[int, int, int],
    split: str,
    n_dropped: int = 0,
) -> RegressionData:
    """Split already-ordered rows into consecutive blocks of ``sizes`` and standardise them."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise DataError(f"{name}: x must be (n, d) and y (n,), got {x.shape} and {y.shape}.")
    if x.shape[1] != len(feature_names):
        raise DataError(
            f"{name}: {x.shape[1]} feature columns but {len(feature_names)} feature names."
        )
    n_train, n_val, n_test = (int(s) for s in sizes)
    if min(n_train, n_val, n_test) < 1 or n_train + n_val + n_test != len(x):
        raise DataError(
            f"{name}: cannot split {len(x)} rows into train/val/test = {n_train}/{n_val}/{n_test}; "
            "every split needs at least one row. Use more rows or larger fractions."
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DataError(f"{name}: non-finite values remain; drop or fill them before splitting.")

    x_mean, x_std = _mean_std(x[:n_train])
    y_mean, y_std = _mean_std(y[:n_train])
    xs = torch.from_numpy(((x - x_mean) / x_std).astype(np.float32))
    ys = torch.from_numpy(((y - y_mean) / y_std).astype(np.float32)).unsqueeze(1)
    a, b = n_train, n_train + n_val
    return RegressionData(
        name=name,
        feature_names=list(feature_names),
        x_train=xs[:a],
        y_train=ys[:a],
        x_val=xs[a:b],
        y_val=ys[a:b],
        x_test=xs[b:],
        y_test=ys[b:],
        x_mean=torch.from_numpy(x_mean.astype(np.float32)),
        x_std=torch.from_numpy(x_std.astype(np.float32)),
        y_mean=float(y_mean),
        y_std=float(y_std),
        split=split,
        n_dropped=int(n_dropped),
    )


def from_frame(
    df: pd.DataFrame,
    target: str,
    *,
    name: str,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    shuffle_seed: int | None = None,
    max_rows: int | None = None,
    features: Sequence[str] | None = None,
    split_label: str | None = None,
) -> RegressionData:
    """Turn a DataFrame into :class:`RegressionData`.

    Rows with missing or infinite values in the used columns are dropped. The rows are kept in
    frame order (shuffled with ``numpy.random.default_rng(shuffle_seed)`` when a seed is
    given), then cut to the first ``max_rows``, then split by ``fractions``. ``features``
    defaults to every numeric column except the target. ``split_label`` replaces the word
    describing the order in :attr:`RegressionData.split` (e.g. "time-ordered").
    """
    fr = _check_fractions(fractions)
    if target not in df.columns:
        raise DataError(
            f"{name}: target column {target!r} not found; available columns: {list(df.columns)}."
        )
    if not _is_numeric(df[target]):
        raise DataError(
            f"{name}: target column {target!r} has dtype {df[target].dtype}, not numeric; "
            "convert it or choose a numeric target."
        )
    if features is None:
        feats = [c for c in df.columns if c != target and _is_numeric(df[c])]
        if not feats:
            raise DataError(
                f"{name}: no numeric feature columns besides the target {target!r}; "
                f"columns are {list(df.columns)}."
            )
    else:
        feats = list(features)
        if not feats:
            raise DataError(f"{name}: `features` is empty; name at least one column.")
        missing = [c for c in feats if c not in df.columns]
        if missing:
            raise DataError(
                f"{name}: feature columns {missing} not found; available: {list(df.columns)}."
            )
        if target in feats:
            raise DataError(f"{name}: the target {target!r} is also listed as a feature.")
        non_numeric = [c for c in feats if not _is_numeric(df[c])]
        if non_numeric:
            raise DataError(
                f"{name}: feature columns {non_numeric} are not numeric; encode them or leave "
                "them out of `features`."
            )
    if max_rows is not None and (
        isinstance(max_rows, bool) or not isinstance(max_rows, Integral) or max_rows < MIN_ROWS
    ):
        raise DataError(f"{name}: max_rows must be an integer >= {MIN_ROWS}, got {max_rows!r}.")

    values = df[[*feats, target]].to_numpy(dtype=np.float64, na_value=np.nan)
    keep = np.isfinite(values).all(axis=1)
    n_dropped = int((~keep).sum())
    values = values[keep]
    if len(values) < MIN_ROWS:
        raise DataError(
            f"{name}: only {len(values)} rows left after dropping {n_dropped} rows with missing "
            f"values in {[*feats, target]}; at least {MIN_ROWS} are needed."
        )
    if shuffle_seed is not None:
        values = values[np.random.default_rng(shuffle_seed).permutation(len(values))]
        order = f"shuffled (seed {shuffle_seed})"
    else:
        order = split_label or "row-order"
    if max_rows is not None:
        values = values[: int(max_rows)]
    split = f"{order} " + "/".join(f"{100 * f:g}" for f in fr)
    return from_arrays(
        values[:, :-1],
        values[:, -1],
        name=name,
        feature_names=feats,
        sizes=split_sizes(len(values), fr),
        split=split,
        n_dropped=n_dropped,
    )


def load_csv(path: str | Path, target: str, *, name: str | None = None, **kw) -> RegressionData:
    """Read a CSV with a header row and pass it to :func:`from_frame` (``kw`` go there)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file not found: {str(path)!r}; check the path.")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"could not read {str(path)!r} as CSV: {exc}") from exc
    return from_frame(df, target, name=name or path.stem, **kw)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        fr = ()
    if len(fr) != 3 or not all(np.isfinite(f) and f > 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise DataError(
            f"fractions must be three positive numbers (train, val, test) summing to 1, "
            f"got {fractions!r}."
        )
    return fr  # type: ignore[return-value]


def _is_numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_complex_dtype(col)


def _mean_std(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and population std; a constant column gets std 1 instead of 0."""
    mean = a.mean(axis=0)
    std = a.std(axis=0)
    constant = std <= _CONSTANT_RTOL * np.maximum(np.abs(mean), 1.0)
    return mean, np.where(constant, 1.0, std)
