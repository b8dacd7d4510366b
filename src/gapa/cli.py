"""Command line: ``gapa demo`` (the main job on flights or your own CSV)."""

from __future__ import annotations

import argparse
import sys

import torch

from .demo import DEMO_GAPA, DemoConfig, run_demo
from .errors import GAPAError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gapa", description="Gaussian Process Activations")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="MAP vs GAPA on real flight delays (or --csv PATH --target COL)")
    d.add_argument("--csv", help="your own table: numeric columns are features, rows split 60/20/20")
    d.add_argument("--target", help="the target column of --csv")
    d.add_argument("--split", choices=["time", "shuffled"], default="time",
                   help="flights split: time-ordered (default) or shuffled 60/20/20")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", dest="json_path", help="write one record per method to this file")
    d.add_argument("--figure", default="gapa-demo.png", help="where to save the figure")
    d.add_argument("--layers", help="comma-separated GAPA layers (default: %(default)s)",
                   default=",".join(DEMO_GAPA["layers"]))
    d.add_argument("--k", type=int, default=DEMO_GAPA["k"], help="neighbours (default %(default)s)")
    d.add_argument("--m", type=int, default=DEMO_GAPA["m"],
                   help="inducing points, 0 for the whole cache (default %(default)s)")
    d.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.csv and not args.target:
        print("gapa demo: --csv needs --target COLUMN", file=sys.stderr)
        return 2
    gapa_opts = {"layers": args.layers.split(","), "k": args.k, "m": args.m or None}
    cfg = DemoConfig(csv=args.csv, target=args.target, split=args.split, seed=args.seed,
                     json_path=args.json_path, figure=args.figure, progress=args.progress,
                     gapa=gapa_opts)
    try:
        run_demo(cfg)
    except GAPAError as exc:
        print(f"gapa: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
