"""Every numeric or list argument of ``gapa``: a bad value is argparse's one-line error, exit 2."""

from __future__ import annotations

import pytest

from gapa.cli import main
from helpers import assert_usage_error

PLAN = ["plan", "--n-train", "1000", "--width", "64"]
CASES = [
    # gapa plan
    (["plan", "--n-train", "0", "--width", "64"], "--n-train"),
    (["plan", "--n-train", "-5", "--width", "64"], "--n-train"),
    (["plan", "--n-train", "1e6", "--width", "64"], "--n-train"),
    (["plan", "--n-train", "many", "--width", "64"], "--n-train"),
    (["plan", "--n-train", "1000", "--width", "abc"], "--width"),
    (["plan", "--n-train", "1000", "--width", "0"], "--width"),
    (["plan", "--n-train", "1000", "--width", "64,-1"], "--width"),
    (["plan", "--n-train", "1000", "--width", "64,,256"], "--width"),
    (["plan", "--n-train", "1000", "--width", "1.5"], "--width"),
    (["plan", "--n-train", "1000", "--width", ""], "--width"),
    ([*PLAN, "--queries-per-input", "0"], "--queries-per-input"),
    ([*PLAN, "--m", "-3"], "--m"),
    ([*PLAN, "--m", "x"], "--m"),
    ([*PLAN, "--k", "0"], "--k"),
    ([*PLAN, "--k", "-2"], "--k"),
    ([*PLAN, "--m", "4", "--k", "5"], "--k"),  # more neighbours than inducing points
    ([*PLAN, "--k", "600"], "--k"),  # over the default m of 512
    ([*PLAN, "--m", "all", "--k", "1001"], "--k"),  # over the whole cache
    ([*PLAN, "--m", "0"], "--m"),  # "all" says the whole cache
    ([*PLAN, "--budget", "1e400"], "--budget"),
    ([*PLAN, "--budget", "lots"], "--budget"),
    ([*PLAN, "--budget", "0"], "--budget"),
    ([*PLAN, "--budget", "0.5"], "--budget"),
    ([*PLAN, "--budget=-4GiB"], "--budget"),
    ([*PLAN, "--budget", "1.2.3GiB"], "--budget"),
    ([*PLAN, "--store-dtype", "float64"], "--store-dtype"),
    ([*PLAN, "--search", "annoy"], "--search"),
]


@pytest.mark.parametrize(("argv", "argument"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_argument_is_a_usage_error(argv, argument, capsys):
    assert_usage_error(main, argv, argument, "gapa", capsys)


def test_good_arguments_still_plan(capsys):
    assert main([*PLAN, "--width", " 64, 256 ", "--m", "all", "--k", "1000",
                 "--queries-per-input", "1", "--budget", "4GiB"]) == 0
    out = capsys.readouterr().out
    assert "1,000 training inputs" in out and "within the budget of 4GiB" in out
