"""A synthetic data set of YearPredictionMSD's shape, for timing and memory only.

515,345 rows x 90 features split 400,000 / 63,715 / 51,630 like :func:`gapa_bench.data.load_year`;
the target is a random smooth function of the features plus noise. Its accuracy figures mean
nothing; it exists so that every method can be timed at the size of the published benchmark
without the original file.
"""

from __future__ import annotations

import numpy as np

from .published import YEAR_FEATURES, YEAR_TOTAL, YEAR_TRAIN, YEAR_VAL
from .regression import RegressionData, from_arrays


def synthetic_year(n: int = YEAR_TOTAL, d: int = len(YEAR_FEATURES), *, seed: int = 0
                   ) -> RegressionData:
    """Gaussian features, target ``sin`` of random projections plus 10% noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((d, 8), dtype=np.float32) / np.sqrt(d)
    y = np.sin(x @ w).sum(axis=1) + 0.1 * rng.standard_normal(n, dtype=np.float32)
    sizes = tuple(round(s * n / YEAR_TOTAL) for s in (YEAR_TRAIN, YEAR_VAL))
    return from_arrays(
        x, y, name="year-synthetic", feature_names=[f"x{i}" for i in range(d)],
        sizes=(*sizes, n - sum(sizes)), split="random rows, Year's 400000/63715/51630 sizes",
    )
