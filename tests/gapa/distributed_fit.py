"""A fit across a process group, launched by ``torchrun`` from ``test_distributed.py``.

``python -m torch.distributed.run --standalone --nproc_per_node=2 distributed_fit.py STORE OUT
MODE``: every rank fits an MLP on its ``DistributedSampler`` part of 400 inputs into the shared
``STORE`` and saves its state to ``OUT/rank<r>.gapa``. MODE ``fail``: rank 1's loader raises
after 3 batches; ``absent``: rank 1 leaves without calling fit. A rank whose fit raises writes
the error to ``OUT/rank<r>.err`` and exits with 1.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

import gapa
from gapa.capture.store import ActivationStore
from helpers import mlp

N, BATCH, SHARD_ROWS = 400, 25, 50


def data() -> torch.Tensor:
    """The training inputs every rank samples its part from."""
    return torch.randn(N, 3, generator=torch.Generator().manual_seed(0))


def fit(loader, store) -> gapa.GAPA:
    """The fit both the ranks and the one-process reference run."""
    return gapa.GAPA(mlp([3, 16, 16, 1]), layers=["1", "3"], m=32).fit(
        loader, store=ActivationStore(store, shard_rows=SHARD_ROWS))


class LoaderFailed(Exception):
    pass


def failing(loader, after: int):
    for i, batch in enumerate(loader):
        if i == after:
            raise LoaderFailed(f"rank 1's data loader failed after {after} batches")
        yield batch


def main() -> int:
    store, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        dataset = TensorDataset(data())
        loader = DataLoader(dataset, batch_size=BATCH,
                            sampler=DistributedSampler(dataset, shuffle=False))
        if mode == "fail" and rank == 1:
            loader = failing(loader, after=3)
        if mode == "absent" and rank == 1:
            return 0
        try:
            gm = fit(loader, store)
        except Exception as exc:
            (out / f"rank{rank}.err").write_text(f"{type(exc).__name__}: {exc}")
            return 1
        gm.save(out / f"rank{rank}.gapa")
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
