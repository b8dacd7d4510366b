"""Command line of the benchmark harness: ``gapa-bench demo`` (the main job on flights or your
own CSV), ``gapa-bench regression`` and ``gapa-bench classification`` (the paper's tables),
``gapa-bench report`` (those tables in RESULTS.md and the README, regenerated from records).
Arguments are checked as they are parsed (argparse's one-line error, exit status 2)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gapa.cli import inducing_points, integer
from gapa.errors import GAPAError
from gapa.io import atomic_path

from . import classification_bench as cb
from . import lm_bench, report, segmentation_bench
from .bench import GAPA_DEFAULT, METHODS, parse_methods, run_benchmark, summary_table
from .classifiers import ARCHITECTURES
from .data import DATASETS, load_csv, load_dataset
from .data.images import load_fashion_mnist, subset
from .data.scenes import load_scenes
from .demo import DemoConfig, run_demo
from .plotting import classification_figures, scenes_figure
from .provenance import run_info

CLASS_METHODS = cb.METHODS


def _names(text: str) -> list[str]:
    """argparse type: a non-empty comma-separated list of names."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name; separate names by commas")
    return names


def _ood_sets(text: str) -> list[str]:
    """argparse type: comma-separated OOD and shift sets, from mnist and rotated."""
    sets = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(sets) - {"mnist", "rotated"})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown set(s) {unknown}; use mnist and/or rotated")
    return sets


def seeds_arg(text: str) -> int | list[int]:
    """Read ``--seeds``: N (seeds 0..N-1), a list of distinct seeds ``3,4`` or a range ``2-4``
    (``2-2`` is seed 2 alone)."""
    if "-" in text.strip("-"):
        first, last = (integer(0)(part.strip()) for part in text.split("-", 1))
        if last < first:
            raise argparse.ArgumentTypeError(f"the range {text!r} runs backwards")
        return list(range(first, last + 1))
    if "," not in text:
        return integer(1)(text)
    seeds = [integer(0)(part.strip()) for part in text.split(",")]
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"seeds repeat in {text!r}")
    return seeds


def _device(text: str) -> str:
    """argparse type: a torch device name (cpu, cuda, cuda:1)."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda)") from None
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gapa-bench", description="GAPA's benchmarks and demo")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="MAP vs GAPA on real flight delays (or --csv PATH --target COL)")
    d.set_defaults(command_parser=d)
    d.add_argument("--csv", help="your own table: numeric columns are features, rows split 60/20/20")
    d.add_argument("--target", help="the target column of --csv")
    d.add_argument("--split", choices=["time", "shuffled"], default="time",
                   help="flights split: time-ordered (default) or shuffled 60/20/20")
    d.add_argument("--seed", type=integer(0), default=0)
    d.add_argument("--json", dest="json_path", help="write one record per method to this file")
    d.add_argument("--figure", default="gapa-demo.png", help="where to save the figure")
    d.add_argument("--layers", type=_names,
                   help="comma-separated GAPA layers (default: %(default)s)",
                   default=",".join(GAPA_DEFAULT["layers"]))
    d.add_argument("--k", type=integer(1), default=GAPA_DEFAULT["k"],
                   help="neighbours (default %(default)s)")
    d.add_argument("--m", type=inducing_points, default=GAPA_DEFAULT["m"],
                   help="inducing points, or 'all' for the whole cache (default %(default)s)")
    d.add_argument("--propagation", choices=["diagonal", "jacobian"],
                   default=GAPA_DEFAULT["propagation"],
                   help="how the variance reaches the output (default %(default)s)")
    d.add_argument("--no-progress", dest="progress", action="store_false")
    _bench_parsers(sub)
    rep = sub.add_parser("report", help="regenerate the benchmark tables of Markdown files "
                         "from their JSON records")
    report.add_arguments(rep)
    return p


def _bench_parsers(sub) -> None:
    r = sub.add_parser("regression", help="every method of the regression table, over seeds")
    r.set_defaults(command_parser=r)
    r.add_argument("--dataset", default="flights", choices=sorted(DATASETS),
                   help="flights (default, fetched offline), year-synthetic (timing only), or "
                   "airline|year|taxi with --data-path")
    r.add_argument("--data-path", help="the original file of airline, year or taxi")
    r.add_argument("--csv", help="any table instead of --dataset; needs --target")
    r.add_argument("--target", help="the target column of --csv")
    r.add_argument("--split", choices=["time", "shuffled"], default="time",
                   help="flights split (default %(default)s)")
    r.add_argument("--methods", default="all",
                   help=f"comma-separated, from {', '.join(METHODS)} (default: all)")
    r.add_argument("--seeds", type=seeds_arg, default=5,
                   help="N for seeds 0..N-1 (default %(default)s), a list such as 3,4 or a "
                   "range such as 2-2 (to share a run between processes, each with its own "
                   "--json)")
    r.add_argument("--max-epochs", type=integer(1), default=None,
                   help="cap on backbone training epochs (default: the backbone's own, 40)")
    r.add_argument("--json", dest="json_path", help="write one record per method and seed")
    r.add_argument("--resume", action="store_true",
                   help="keep the records already in --json; run only the missing method/seed pairs")
    r.add_argument("--no-progress", dest="progress", action="store_false")

    c = sub.add_parser("classification", help="GAPA and its peers on a frozen image classifier")
    c.set_defaults(command_parser=c)
    c.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist"])
    c.add_argument("--data-path", help="folder of the Fashion-MNIST IDX files (default: the "
                   "Debian package's, or $GAPA_FASHION_MNIST_DIR)")
    c.add_argument("--backbone", default="mlp", choices=ARCHITECTURES)
    c.add_argument("--ood", type=_ood_sets, default="mnist,rotated",
                   help="comma-separated OOD and shift sets: mnist, rotated (default %(default)s)")
    c.add_argument("--rotated-size", type=integer(1), default=2000,
                   help="test images rotated at each angle (default %(default)s)")
    c.add_argument("--methods", default="all",
                   help=f"comma-separated, from {', '.join(CLASS_METHODS)} (default: all)")
    c.add_argument("--seeds", type=seeds_arg, default=3,
                   help="N for seeds 0..N-1 (default %(default)s), a list such as 1,2 or a "
                   "range 1-2 (records of separate runs are reported together)")
    c.add_argument("--test-size", type=integer(1), help="score on N class-balanced test images "
                   "and N MNIST digits (for methods too slow for the whole sets)")
    c.add_argument("--subset", type=integer(1), help="a quick look: N class-balanced training "
                   "images and N/4 validation and test images")
    c.add_argument("--max-epochs", type=integer(1), help="cap on the training epochs of networks "
                   "that are not cached yet (default: the architecture's own)")
    c.add_argument("--device", type=_device, default="cpu", help="where networks that are not "
                   "cached yet train (cpu, cuda); every method is then scored on the CPU")
    c.add_argument("--json", dest="json_path", help="write one record per method and seed")
    c.add_argument("--figures", help="folder for the reliability, OOD-score and rotation figures")
    c.add_argument("--no-progress", dest="progress", action="store_false")

    sg = sub.add_parser("segmentation", help="per-pixel uncertainty of a frozen U-Net on "
                        "composed Fashion-MNIST scenes")
    sg.set_defaults(command_parser=sg)
    sg.add_argument("--methods", type=_names, default=list(segmentation_bench.METHODS),
                    help=f"comma-separated, from {', '.join(segmentation_bench.METHODS)} "
                    "(default: all)")
    sg.add_argument("--seeds", type=seeds_arg, default=3,
                    help="N for seeds 0..N-1 (default %(default)s), a list such as 1,2 or a "
                    "range 1-2 (records of separate runs are reported together)")
    sg.add_argument("--side", type=integer(56), default=64, help="scene side in pixels")
    sg.add_argument("--train-scenes", type=integer(1), default=3000)
    sg.add_argument("--val-scenes", type=integer(1), default=300)
    sg.add_argument("--test-scenes", type=integer(1), default=300)
    sg.add_argument("--ood-scenes", type=integer(1), default=200,
                    help="scenes per unknown kind (MNIST digits, photo patches)")
    sg.add_argument("--json", dest="json_path", help="write one record per method and seed")
    sg.add_argument("--figures", help="folder for the figures: scenes and label maps, per-pixel "
                    "uncertainty maps, reliability, OOD score histograms")
    sg.add_argument("--no-progress", dest="progress", action="store_false")

    lm = sub.add_parser("lm", help="token-level uncertainty of SmolLM2-135M on Jane Austen")
    lm.set_defaults(command_parser=lm)
    lm.add_argument("--methods", type=_names, default=list(lm_bench.METHODS),
                    help=f"comma-separated, from {', '.join(lm_bench.METHODS)} (default: all)")
    lm.add_argument("--fit-sequences", type=integer(2), default=128,
                    help="Austen sequences every method is fitted on (default %(default)s)")
    lm.add_argument("--eval-sequences", type=integer(2), default=32,
                    help="sequences per validation, test and OOD set (default %(default)s)")
    lm.add_argument("--length", type=integer(2), default=128, help="tokens per sequence")
    lm.add_argument("--batch", type=integer(1), default=8, help="sequences per forward pass")
    lm.add_argument("--seed", type=integer(0), default=0)
    lm.add_argument("--json", dest="json_path", help="write the record to this file")


def _regression(args) -> None:
    methods = parse_methods(args.methods)
    if args.csv:
        data = load_csv(args.csv, args.target)
    else:
        kw = {"split": args.split} if args.dataset == "flights" else {}
        data = load_dataset(args.dataset, args.data_path, **kw)
    print(f"data: {data.describe()}")
    train = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    # a shuffled split draws shuffle s for seed s: seeds are independent repetitions
    per_seed = (None if args.csv or args.dataset != "flights" or args.split != "shuffled"
                else lambda seed: load_dataset("flights", None, split="shuffled", seed=seed))
    results = run_benchmark(data, methods, args.seeds, train=train, data_for_seed=per_seed,
                            progress=args.progress, json_path=args.json_path,
                            resume=args.resume)
    if args.json_path:
        print(f"records written to {args.json_path}")
    print(f"\n{data.name}: mean ± standard error over seeds (CRPS, RMSE in target units; "
          "lower is better, best in bold)")
    print(summary_table(results))


def _classification(args) -> None:
    methods = cb.parse_methods(args.methods)
    data = load_fashion_mnist(args.data_path)
    if args.subset:
        data = subset(data, args.subset, max(1, args.subset // 4))
    print(f"data: {data.describe()}; backbone: {args.backbone}")
    sets = cb.eval_sets(data, args.ood,
                        rotated_size=args.rotated_size, test_size=args.test_size)
    results = cb.run_benchmark(data, args.backbone, methods, args.seeds, sets=sets,
                               train={"device": args.device} | (
                                   {"epochs": args.max_epochs} if args.max_epochs else {}),
                               progress=args.progress,
                               json_path=args.json_path)
    if args.json_path:
        print(f"records written to {args.json_path}")
    if args.figures and results:
        for path in classification_figures(args.figures, results, sets.y_test,
                                           title=f"({data.name}, {args.backbone})"):
            print(f"figure: {path}")
    print(f"\n{data.name}, {args.backbone}: mean ± standard error over seeds (best in bold; "
          "accuracy and AUROC higher is better, the rest lower)")
    print(cb.summary_table(results))


def _segmentation(args) -> None:
    unknown = sorted(set(args.methods) - set(segmentation_bench.METHODS))
    if unknown:
        args.command_parser.error(
            f"unknown method(s) {unknown}; use {', '.join(segmentation_bench.METHODS)}")
    sizes = {"side": args.side, "n_train": args.train_scenes, "n_val": args.val_scenes,
             "n_test": args.test_scenes, "n_ood": args.ood_scenes}
    if args.figures:  # the scenes with their labels; the rest come with the results
        data = load_scenes(seed=0, **{**sizes, "n_train": 8, "n_val": 8, "n_test": 8,
                                      "n_ood": 8})
        sets = {"train": data.train, "test": data.test,
                **{f"OOD {k}": v for k, v in data.ood.items()}}
        path = scenes_figure(Path(args.figures) / "segmentation-scenes.png",
                             {k: (v.images[:, 0].numpy(), v.labels.numpy())
                              for k, v in sets.items()}, data.classes)
        print(f"figure: {path}")
    segmentation_bench.run_benchmark(args.methods, args.seeds, progress=args.progress,
                                     json_path=args.json_path, figures=args.figures, **sizes)
    if args.json_path:
        print(f"records written to {args.json_path}")


def _lm(args) -> None:
    unknown = sorted(set(args.methods) - set(lm_bench.METHODS))
    if unknown:
        args.command_parser.error(f"unknown method(s) {unknown}; use {', '.join(lm_bench.METHODS)}")
    run = run_info(sys.argv)  # the code that runs, not the code at the end of a long run
    record = lm_bench.run_lm_benchmark(methods=args.methods, n_fit=args.fit_sequences,
                                       n_eval=args.eval_sequences, length=args.length,
                                       batch=args.batch, seed=args.seed)
    record["run"] = run
    if args.json_path:
        with atomic_path(args.json_path) as tmp, open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        print(f"record written to {args.json_path}")


def _demo_config(args) -> DemoConfig:
    gapa_opts = {"layers": args.layers, "k": args.k, "m": args.m,
                 "propagation": args.propagation}
    return DemoConfig(csv=args.csv, target=args.target, split=args.split, seed=args.seed,
                      json_path=args.json_path, figure=args.figure, progress=args.progress,
                      gapa=gapa_opts)


def _check_together(args) -> None:
    """Arguments valid alone but not together: argparse's error (exit status 2)."""
    error = args.command_parser.error
    if getattr(args, "csv", None) and not args.target:
        error("argument --target: --csv needs --target COLUMN")
    if args.command == "demo" and args.m is not None and args.k > args.m:
        error(f"argument --k: {args.k} neighbours exceed the --m {args.m} inducing points; "
              "lower --k or raise --m")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "report":
        return report.run(args)
    _check_together(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        {"demo": lambda: run_demo(_demo_config(args)), "regression": lambda: _regression(args),
         "classification": lambda: _classification(args), "lm": lambda: _lm(args),
         "segmentation": lambda: _segmentation(args)}[args.command]()
    except GAPAError as exc:
        print(f"gapa-bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
