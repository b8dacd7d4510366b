"""Every numeric or list argument of ``gapa-bench``: a bad value is argparse's one-line error,
exit 2."""

from __future__ import annotations

import pytest

from gapa_bench.cli import main
from helpers import assert_usage_error

CASES = [
    # gapa-bench demo
    (["demo", "--k", "0"], "--k"),
    (["demo", "--m", "-1"], "--m"),
    (["demo", "--m", "3", "--k", "4"], "--k"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--seed", "one"], "--seed"),
    (["demo", "--layers", "1,,3"], "--layers"),
    (["demo", "--layers", ""], "--layers"),
    (["demo", "--csv", "table.csv"], "--target"),
    # gapa-bench regression
    (["regression", "--seeds", "0"], "--seeds"),
    (["regression", "--seeds", "2.5"], "--seeds"),
    (["regression", "--seeds", "3,3"], "--seeds"),
    (["regression", "--seeds", "1,-2"], "--seeds"),
    (["regression", "--seeds", "4-2"], "--seeds"),
    (["regression", "--seeds", "-1"], "--seeds"),
    (["regression", "--max-epochs", "0"], "--max-epochs"),
    # gapa-bench classification
    (["classification", "--seeds", "-1"], "--seeds"),
    (["classification", "--seeds", "2,2"], "--seeds"),
    (["segmentation", "--seeds", "0"], "--seeds"),
    (["segmentation", "--seeds", "3-1"], "--seeds"),
    (["classification", "--rotated-size", "0"], "--rotated-size"),
    (["classification", "--test-size", "-10"], "--test-size"),
    (["classification", "--subset", "0"], "--subset"),
    (["classification", "--max-epochs", "x"], "--max-epochs"),
    (["classification", "--ood", "mnist,svhn"], "--ood"),
    (["classification", "--device", "gpu9"], "--device"),
]


@pytest.mark.parametrize(("argv", "argument"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_argument_is_a_usage_error(argv, argument, capsys):
    assert_usage_error(main, argv, argument, "gapa-bench", capsys)


def test_seed_ranges_and_lists():
    from gapa_bench.cli import seeds_arg

    assert seeds_arg("5") == 5 and seeds_arg("3,4") == [3, 4]
    assert seeds_arg("2-2") == [2] and seeds_arg("1-3") == [1, 2, 3]
