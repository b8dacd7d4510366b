"""Validation-only selection: every candidate is tried in declared order, the lowest finite score
wins, ties go to the earlier candidate, and the record says all of it."""

from __future__ import annotations

import math

import pytest

from gapa.errors import ConfigurationError
from gapa_bench.selection import grid, select


def test_grid_is_every_combination_in_declared_order():
    assert grid({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]


@pytest.mark.parametrize("bad", [{"a": []}, {"a": "abc"}])
def test_grid_refuses_empty_or_string_candidates(bad):
    with pytest.raises(ConfigurationError, match="'a'"):
        grid(bad)


def test_select_keeps_the_lowest_score_and_records_every_try():
    scores = {1: 3.0, 2: 1.0, 3: 2.0}
    fitted, sel = select({"m": [1, 2, 3]}, lambda s: (scores[s["m"]], f"fit{s['m']}"))
    assert fitted == "fit2" and sel.chosen == {"m": 2}
    rec = sel.record()
    assert rec["candidates"] == {"m": [1, 2, 3]}
    assert rec["tried"] == [{"m": 1, "score": 3.0}, {"m": 2, "score": 1.0}, {"m": 3, "score": 2.0}]
    assert rec["criterion"] == "validation NLL"


def test_ties_go_to_the_earlier_candidate_and_nan_never_wins():
    fitted, sel = select({"m": [1, 2, 3]}, lambda s: ({1: math.nan, 2: 1.0, 3: 1.0}[s["m"]], s))
    assert sel.chosen == {"m": 2} and fitted == {"m": 2}


def test_all_non_finite_scores_fail_loudly():
    with pytest.raises(ConfigurationError, match="no candidate had a finite"):
        select({"m": [1, 2]}, lambda s: (math.inf, s))
