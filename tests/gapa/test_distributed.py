"""fit across a torch.distributed process group: ``torchrun`` on CPU with gloo, two ranks.

The script the ranks run is ``distributed_fit.py``. Every launch is a few seconds (three Python
processes importing torch); ``subprocess.run(timeout=...)`` turns a hang into a failure.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import distributed_fit as script
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import gapa
from gapa.capture.distributed import RANKS, process_group, read_ranks, write_ranks
from gapa.capture.store import ActivationStore
from gapa.errors import CorruptStoreError
from helpers import mlp

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo back end is not available in this torch build")

LAUNCH_TIMEOUT = 120  # seconds: far above a launch (~4 s idle), far below a hung CI job


def _torchrun(store: Path, out: Path, mode: str) -> tuple[subprocess.CompletedProcess, float]:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         script.__file__, str(store), str(out), mode],
        capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT)
    return proc, time.perf_counter() - start


def _one_process(tmp_path: Path) -> bytes:
    """The state of one process fitted on rank 0's part (DistributedSampler), then rank 1's."""
    x = script.data()
    loader = DataLoader(TensorDataset(torch.cat([x[0::2], x[1::2]])), batch_size=script.BATCH)
    script.fit(loader, tmp_path / "one-store").save(tmp_path / "one.gapa")
    return (tmp_path / "one.gapa").read_bytes()


def test_two_ranks_fit_the_state_of_one_process_bit_for_bit(tmp_path):
    store, out = tmp_path / "store", tmp_path / "out"
    proc, _ = _torchrun(store, out, "ok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (out / "rank0.gapa").read_bytes(), (out / "rank1.gapa").read_bytes()
    assert rank0 == rank1  # the same fitted state on every rank
    assert rank0 == _one_process(tmp_path)  # no reduction: the same floats in the same order
    # each rank wrote its own store; rank 0 alone the rank list
    assert sorted(p.name for p in store.iterdir()) == [
        "rank-00000-of-00002", "rank-00001-of-00002", RANKS]
    assert json.loads((store / RANKS).read_text())["inputs"] == [200, 200]
    # one process refits from the rank stores to the same state
    refit = gapa.GAPA(mlp([3, 16, 16, 1]), layers=["1", "3"], m=32).fit(None, store=store)
    refit.save(tmp_path / "refit.gapa")
    assert (tmp_path / "refit.gapa").read_bytes() == rank0


def test_a_failing_rank_stops_every_rank_and_the_fit_resumes(tmp_path):
    store = tmp_path / "store"
    proc, seconds = _torchrun(store, tmp_path / "failed", "fail")
    assert proc.returncode != 0
    errors = {r: (tmp_path / "failed" / f"rank{r}.err").read_text() for r in (0, 1)}
    assert errors[1].startswith("LoaderFailed: rank 1's data loader failed")  # its own error
    assert errors[0].startswith("DistributedError: rank 1 of 2 failed in the capture: "
                                "LoaderFailed")
    assert seconds < LAUNCH_TIMEOUT / 2
    # rank 1 wrote a shard before it failed; the relaunch resumes from it
    assert json.loads((store / "rank-00001-of-00002" / "manifest.json").read_text())["shards"]
    proc, _ = _torchrun(store, tmp_path / "resumed", "ok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "resumed" / "rank1.gapa").read_bytes() == _one_process(tmp_path)


def test_a_rank_that_never_fits_gives_a_clear_error_not_a_hang(tmp_path):
    proc, seconds = _torchrun(tmp_path / "store", tmp_path / "out", "absent")
    assert proc.returncode != 0
    error = (tmp_path / "out" / "rank0.err").read_text()
    assert error.startswith("DistributedError: the ranks could not agree in the capture")
    assert "did not call fit" in error
    assert seconds < LAUNCH_TIMEOUT / 2


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one process, in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_options_of_a_fit_in_a_process_group(tmp_path, group_of_one):
    x = script.data()
    assert process_group(None) is None  # one process: a plain fit
    assert process_group(True) == (0, 1)
    gm = gapa.GAPA(mlp([3, 16, 16, 1]), m=32)
    with pytest.raises(gapa.errors.ConfigurationError, match="needs store=DIR"):
        gm.fit(x, distributed=True)
    with pytest.raises(gapa.errors.ConfigurationError, match="distributed must be"):
        gm.fit(x, store=tmp_path / "s", distributed="yes")
    across = gm.fit(x, store=ActivationStore(tmp_path / "across", shard_rows=100),
                    distributed=True)
    assert (tmp_path / "across" / "rank-00000-of-00001").is_dir()
    plain = gapa.GAPA(mlp([3, 16, 16, 1]), m=32).fit(
        x, store=ActivationStore(tmp_path / "plain", shard_rows=100))
    q = torch.randn(20, 3)
    assert torch.equal(across(q).var, plain(q).var)


def test_process_group_without_one():
    assert not dist.is_initialized()
    assert process_group(None) is None and process_group(False) is None
    with pytest.raises(gapa.errors.ConfigurationError, match="initialised"):
        process_group(True)


@pytest.mark.parametrize("ids", [1, "yes"])
def test_a_rank_list_with_a_malformed_input_kind_is_refused(tmp_path, ids):
    write_ranks(tmp_path, 2, [10, 10], (3,), True)
    assert read_ranks(tmp_path)["input_ids"] is True
    record = json.loads((tmp_path / RANKS).read_text())
    del record["input_ids"]  # as written before the kind was kept: it reads
    (tmp_path / RANKS).write_text(json.dumps(record))
    assert read_ranks(tmp_path).get("input_ids") is None
    (tmp_path / RANKS).write_text(json.dumps({**record, "input_ids": ids}))
    with pytest.raises(CorruptStoreError, match="malformed"):
        read_ranks(tmp_path)
