"""Choosing a method's settings on validation data only, from a candidate set declared in code.

Every benchmark method with a setting to choose (GAPA's layer and inducing points, MC dropout's
rate, ...) goes through :func:`select`: each candidate is fitted, scored on the validation split,
and the best is kept; the candidates, every validation score and the choice land in the record
(:meth:`Selection.record`), so a reader can check that no test number chose anything.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gapa.errors import ConfigurationError

T = TypeVar("T")


@dataclass(frozen=True)
class Selection:
    """The candidates tried, each one's validation score, and the one chosen."""

    candidates: dict[str, list]
    tried: list[tuple[dict, float]]
    chosen: dict
    criterion: str

    def record(self) -> dict:
        """JSON-ready: ``{"criterion", "candidates", "chosen", "tried": [{**setting, "score"}]}``."""
        return {"criterion": self.criterion, "candidates": self.candidates, "chosen": self.chosen,
                "tried": [{**setting, "score": score} for setting, score in self.tried]}


def grid(candidates: Mapping[str, Sequence]) -> list[dict]:
    """Every combination of the candidate values, in declared order (the first name varies
    slowest)."""
    for name, values in candidates.items():
        if isinstance(values, str | bytes) or len(values) == 0:
            raise ConfigurationError(f"candidates for {name!r} must be a non-empty list of values, "
                                     f"got {values!r}")
    names = list(candidates)
    return [dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(candidates[n] for n in names))]


def select(
    candidates: Mapping[str, Sequence],
    fit: Callable[[dict], tuple[float, T]],
    *,
    criterion: str = "validation NLL",
) -> tuple[T, Selection]:
    """Fit every setting of :func:`grid` (``fit(setting) -> (validation score, fitted)``, lower
    is better) and return the best fitted object with the :class:`Selection` that chose it.

    Ties go to the earlier setting, so the declared order states the preference (cheaper
    first). A non-finite score never wins; when every score is non-finite the selection fails
    with :class:`~gapa.errors.ConfigurationError` naming the scores, rather than picking one.
    """
    settings = grid(candidates)
    best: tuple[float, Any, dict] | None = None
    tried = []
    for setting in settings:
        score, fitted = fit(dict(setting))
        score = float(score)
        tried.append((setting, score))
        if math.isfinite(score) and (best is None or score < best[0]):
            best = (score, fitted, setting)
        del fitted  # only the best fitted object is held
    if best is None:
        raise ConfigurationError(f"no candidate had a finite {criterion}: {tried}")
    return best[1], Selection({k: list(v) for k, v in candidates.items()}, tried, best[2],
                              criterion)
