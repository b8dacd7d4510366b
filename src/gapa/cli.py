"""Command line of the library: ``gapa plan``.

``gapa plan`` shows the expected cache, index and memory of a fit, before fitting. The
benchmarks and the demo are ``gapa-bench`` (the harness, ``gapa[bench]``). Every numeric or list
argument is checked as it is parsed: a bad value ends in argparse's one-line ``error:`` message
and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import ConfigurationError, GAPAError
from .gp.search import SearchBackend
from .gp.site import GPConfig
from .plan import parse_bytes, plan_fit


def integer(minimum: int):
    """Build an argparse type that reads an integer of at least ``minimum``.

    The parser it returns raises :class:`argparse.ArgumentTypeError` for other text.
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def inducing_points(text: str) -> int | None:
    """Read ``--m``: a positive number of inducing points, or ``all`` (an argparse type).

    ``all`` (any case) is the whole cache, which it returns as the library's ``m=None``;
    other text that is not a positive integer raises :class:`argparse.ArgumentTypeError`.
    """
    if text.strip().lower() == "all":
        return None
    return integer(1)(text)


def _widths(text: str) -> list[int]:
    """Read comma-separated positive unit counts (an argparse type)."""
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of unit counts (e.g. 256 or 64,256)") from None
    if min(widths) < 1:
        raise argparse.ArgumentTypeError(f"needs positive unit counts, got {text!r}")
    return widths


def _budget(text: str) -> str:
    """Check a memory size such as 4GiB and keep it as written, for messages (argparse type)."""
    try:
        parse_bytes(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gapa", description="Gaussian Process Activations")
    sub = p.add_subparsers(dest="command", required=True)
    _plan_parser(sub)
    return p


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="expected cache, index and memory of a fit, before fitting")
    p.set_defaults(command_parser=p)
    p.add_argument("--n-train", type=integer(1), required=True, help="training inputs")
    p.add_argument("--width", type=_widths, required=True,
                   help="units of each GAPA call site, comma-separated (e.g. 256 or 64,256)")
    p.add_argument("--queries-per-input", type=integer(1), default=1,
                   help="GP queries per input at each site: 1 for MLPs or queries='per_input', "
                   "H x W for a feature map's positions (default %(default)s)")
    p.add_argument("--m", type=inducing_points, default=GPConfig.m,
                   help="inducing points per site, or 'all' for the whole cache "
                   "(default %(default)s)")
    p.add_argument("--k", type=integer(1), default=1, help="neighbours (default %(default)s)")
    p.add_argument("--search", default=GPConfig.search.value,
                   choices=[b.value for b in SearchBackend])
    p.add_argument("--on-disk", action="store_true",
                   help="the cache streams to an activation store on disk")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--budget", type=_budget,
                   help="memory budget, e.g. 4GiB: exit 1 when the plan exceeds it")


def _plan(args) -> None:
    config = GPConfig(k=args.k, m=args.m, search=SearchBackend(args.search))
    sites = {f"site{i}": (w, args.queries_per_input) for i, w in enumerate(args.width)}
    plan = plan_fit(args.n_train, sites, config, on_disk=args.on_disk,
                    store_dtype=args.store_dtype)
    if args.budget:
        plan.check(args.budget)  # the error shows the plan
    print(plan)
    if args.budget:
        print(f"within the budget of {args.budget}")


def _check_together(args) -> None:
    """Refuse arguments valid alone but not together with argparse's error (exit status 2)."""
    rows = args.n_train * args.queries_per_input
    rows = min(args.m, rows) if args.m is not None else rows
    if args.k > rows:
        args.command_parser.error(
            f"argument --k: {args.k} neighbours exceed the {rows:,} conditioning rows "
            f"(--m {args.m or 'all'}, --n-train {args.n_train} x --queries-per-input "
            f"{args.queries_per_input}); lower --k")


def main(argv: list[str] | None = None) -> int:
    """Run the ``gapa`` command line.

    Parameters
    ----------
    argv : list of str, optional
        The arguments without the program name; None reads them from ``sys.argv``.

    Returns
    -------
    int
        The exit status: 0, or 1 when the plan raises a :class:`gapa.errors.GAPAError` (such
        as a plan over ``--budget``), which is printed to stderr. Invalid arguments exit
        through argparse instead (:class:`SystemExit`, status 2).
    """
    args = _parser().parse_args(argv)
    _check_together(args)
    try:
        _plan(args)
    except GAPAError as exc:
        print(f"gapa: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
