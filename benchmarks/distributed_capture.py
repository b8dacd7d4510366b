"""Capture throughput of a fit across a ``torch.distributed`` process group, on 1 and 2 processes.

Each run launches ``torchrun --standalone --nproc_per_node=P`` on this script; every rank fits
an MLP (``--width`` units, two GAPA layers) on its ``DistributedSampler`` part of ``--rows``
random inputs into a store in a temporary directory. Reported per P: the capture's rows per
second (all ranks' rows over the slowest rank's capture time), and the whole fit's (the capture,
the agreement and the build of the GPs from every rank's shards, which each rank does whole).
Each process runs ``--threads`` threads (1 by default, so P processes use P cores). With
``--device cuda`` rank r uses GPU r modulo the GPUs present, and the group runs on gloo (which
gathers the small agreement objects through the CPU) unless ``--backend nccl``.

Usage: python benchmarks/distributed_capture.py [--procs 1,2] [--rows 100000] [--width 256]
       [--device cpu|cuda] [--backend gloo|nccl] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def worker(args: argparse.Namespace) -> None:
    """One rank: fit into ``args.store`` and, on rank 0, print the timings as JSON."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    import gapa

    torch.set_num_threads(args.threads)
    dist.init_process_group(args.backend, timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))
                              % torch.cuda.device_count())
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same weights on every rank (a fit refuses other weights)
    gen = torch.Generator().manual_seed(0)
    w = args.width
    model = nn.Sequential(nn.Linear(64, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(),
                          nn.Linear(w, 10)).eval().to(device)
    x = torch.randn(args.rows, 64, generator=gen).to(device)
    dataset = TensorDataset(x)
    loader = DataLoader(dataset, batch_size=1024,
                        sampler=DistributedSampler(dataset, shuffle=False))
    gm = gapa.GAPA(model, layers=["1", "3"], m=64)
    seconds = {}

    class Timed:  # the capture alone: the fit has read every batch when the loader runs out
        def __len__(self):
            return len(loader)

        def __iter__(self):
            yield from loader
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds["capture"] = time.perf_counter() - t0

    dist.barrier()
    t0 = time.perf_counter()
    gm.fit(Timed(), store=args.store)
    seconds["fit"] = time.perf_counter() - t0
    every = [None] * world
    dist.all_gather_object(every, seconds)
    if rank == 0:
        print("RESULT " + json.dumps({
            "procs": world, "rows": gm.state_dict()["fit_inputs"],
            "capture": max(s["capture"] for s in every), "fit": max(s["fit"] for s in every)}))
    dist.destroy_process_group()


def launch(procs: int, args: argparse.Namespace) -> dict:
    """Run ``procs`` ranks of :func:`worker` under torchrun; return rank 0's timings."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", __file__, "--worker", "--store", str(Path(tmp) / "s"),
               "--rows", str(args.rows), "--width", str(args.width), "--device", args.device,
               "--backend", args.backend, "--threads", str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"torchrun with {procs} processes failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[0].removeprefix("RESULT "))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--procs", default="1,2")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import header

    torch.set_num_threads(args.threads)
    print(f"# {header(f'{args.device}, backend {args.backend}')}")
    print(f"# python benchmarks/distributed_capture.py --procs {args.procs} --rows {args.rows} "
          f"--width {args.width} --device {args.device} --backend {args.backend} "
          f"--threads {args.threads}")
    print("| processes | rows | capture s | capture rows/s | fit s | fit rows/s |")
    print("|---|---|---|---|---|---|")
    for procs in (int(n) for n in args.procs.split(",")):
        r = launch(procs, args)
        print(f"| {procs} | {r['rows']} | {r['capture']:.2f} | {r['rows'] / r['capture']:,.0f} "
              f"| {r['fit']:.2f} | {r['rows'] / r['fit']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
