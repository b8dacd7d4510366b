"""A fit across the ranks of a ``torch.distributed`` process group (``torchrun``).

Inside an initialised process group of several processes, ``GAPA.fit(data, store=DIR)`` is
data-parallel: ``data`` is this rank's part of the training set (a ``DataLoader`` with a
``DistributedSampler``), and each rank streams its activations into its own store,
``DIR/rank-RRRRR-of-WWWWW`` (an ordinary :class:`gapa.capture.store.ActivationStore`, with its
own lock, checked shards and resume). Then every rank reads the shards of all ranks in rank
order (rank 0's rows, then rank 1's, ...) and builds the same GPs from the same rows with the
same seed: the fitted states are the same bytes on every rank, and equal to a one-process fit
over rank 0's inputs followed by rank 1's, ... (with the same shard boundaries, which set the
order of the streamed float sums). Nothing is all-reduced, so nothing depends on the order of
a reduction. Only rank 0 writes a file outside its own store: :data:`RANKS`, which lets one
process refit from the finished rank stores with ``fit(None, store=DIR)``.

The ranks agree twice, after the capture and after the build, by gathering every rank's
outcome (:func:`on_every_rank`): a rank that raises makes every other rank raise
:class:`gapa.errors.DistributedError` naming it, instead of waiting for it. A rank that dies or
hangs is caught by the process group's own timeout (``init_process_group(timeout=...)``), and
``torchrun`` stops the other workers when one exits with an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from ..errors import ConfigurationError, CorruptStoreError, DistributedError, StoreMismatchError
from ..io import atomic_path
from .store import ActivationStore, StoredRows

#: The file rank 0 writes in the shared store directory once every rank's capture is finished:
#: the world size, the rank stores in rank order and their inputs.
RANKS = "ranks.json"
RANKS_FORMAT = 1

T = TypeVar("T")


def process_group(distributed: bool | None) -> tuple[int, int] | None:
    """Return ``(rank, world_size)`` when a fit is to run across a process group, else None.

    Parameters
    ----------
    distributed : bool or None
        ``None``: across the process group when one is initialised with more than one
        process; ``False``: this process alone; ``True``: across the process group, which
        must be initialised.

    Raises
    ------
    ConfigurationError
        ``distributed`` is not a bool or None, or is True without an initialised group.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ConfigurationError(f"distributed must be True, False or None, got {distributed!r}")
    if distributed is False:
        return None
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if distributed:
            raise ConfigurationError(
                "distributed=True needs an initialised torch.distributed process group: launch "
                "with torchrun and call torch.distributed.init_process_group() first")
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    return (rank, world) if world > 1 or distributed else None


def rank_store_name(rank: int, world: int) -> str:
    """Return the directory name of rank ``rank``'s store in a group of ``world`` processes."""
    return f"rank-{rank:05d}-of-{world:05d}"


def gather(obj, what: str, world: int) -> list:
    """Return every rank's ``obj`` (picklable), in rank order.

    Raises
    ------
    DistributedError
        The collective failed: a rank died, timed out or never called it.
    """
    out: list = [None] * world
    try:
        torch.distributed.all_gather_object(out, obj)
    except Exception as exc:  # gloo and nccl raise RuntimeError subclasses, or their own
        raise DistributedError(
            f"the ranks could not agree {what} ({type(exc).__name__}: {exc}): a rank died, "
            "timed out (the process group's timeout) or did not call fit. Every rank of the "
            "process group must call fit(..., store=DIR); distributed=False fits one process "
            "alone") from exc
    return out


def on_every_rank(what: str, fn: Callable[[], T], rank: int, world: int) -> list[T]:
    """Run ``fn`` on this rank, then return every rank's result, in rank order.

    An exception of ``fn`` is raised on its own rank (after the others have heard of it); every
    other rank raises :class:`gapa.errors.DistributedError` naming the first failing rank.

    Parameters
    ----------
    what : str
        The step, for the messages ("after the capture").
    fn : callable
        The step on this rank; its result must be picklable.
    rank, world : int
        This process's rank and the group's size.

    Raises
    ------
    DistributedError
        Another rank failed, or the ranks could not agree at all.
    """
    error = None
    try:
        outcome = ("ok", fn())
    except Exception as exc:
        error = exc
        outcome = ("error", f"{type(exc).__name__}: {exc}")
    try:
        results = gather(outcome, what, world)
    except DistributedError:
        if error is not None:
            raise error from None  # its own failure says more than the others' absence
        raise
    if error is not None:
        raise error
    failed = [(r, message) for r, (status, message) in enumerate(results) if status == "error"]
    if failed:
        r, message = failed[0]
        others = f" (and ranks {[f[0] for f in failed[1:]]})" if len(failed) > 1 else ""
        raise DistributedError(f"rank {r} of {world}{others} failed {what}: {message}; rank "
                               f"{rank} stops too")
    return [payload for _, payload in results]


def joined_rows(stores: Sequence[ActivationStore], key: str,
                device: torch.device) -> StoredRows:
    """Return call site ``key``'s rows of every store, read as one, in the stores' order.

    Raises
    ------
    StoreMismatchError
        The stores differ in the site's width, dtype or the store dtype.
    """
    parts = [store.rows(key, device) for store in stores]
    first = parts[0]
    for store, part in zip(stores, parts, strict=True):
        if (part.width, part.dtype, part.file_dtype) != (first.width, first.dtype,
                                                         first.file_dtype):
            raise StoreMismatchError(
                f"the activation store {store.path} holds {key!r} as {part.width} units of "
                f"{part.dtype} in {part.file_dtype}, the first rank's store {stores[0].path} "
                f"as {first.width} of {first.dtype} in {first.file_dtype}")
    return StoredRows([root for part in parts for root in part.roots],
                      [spec for part in parts for spec in part.shards], first.width,
                      first.file_dtype, first.dtype, first.device)


def rank_stores(root: Path, names: Sequence[str], signature: dict) -> list[ActivationStore]:
    """Read the finished rank stores ``names`` of the shared directory ``root``.

    Raises
    ------
    CorruptStoreError
        A store is missing, unfinished or damaged.
    StoreMismatchError
        A store was written for another signature (model, layers, queries).
    """
    stores = []
    for name in names:
        store = ActivationStore(root / name).read()
        if not store.complete:
            raise CorruptStoreError(f"the rank store {store.path} is not complete; fit again "
                                    "across the process group with the training data")
        mismatch = [k for k, v in signature.items() if store.manifest["signature"].get(k) != v]
        if mismatch:
            raise StoreMismatchError(f"the rank store {store.path} was written for another "
                                     f"{', '.join(mismatch)}; use a new store path or delete "
                                     "this one")
        stores.append(store)
    return stores


def write_ranks(root: Path, world: int, inputs: Sequence[int],
                input_shape: tuple[int, ...], input_ids: bool | None = None) -> None:
    """Write :data:`RANKS` in the shared store directory ``root`` (rank 0 only), atomically."""
    record = {"format": RANKS_FORMAT, "world_size": world,
              "stores": [rank_store_name(r, world) for r in range(world)],
              "inputs": list(inputs), "input_shape": list(input_shape), "input_ids": input_ids}
    with atomic_path(root / RANKS) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)


def read_ranks(root: Path) -> dict:
    """Return the :data:`RANKS` record of the shared store directory ``root``.

    Raises
    ------
    CorruptStoreError
        The file is unreadable or malformed.
    """
    path = root / RANKS
    try:
        record = json.loads(path.read_text())
        stores, inputs = record["stores"], record["inputs"]
        shape, ids = record["input_shape"], record.get("input_ids")  # ids: absent before it
        ok = (record.get("format") == RANKS_FORMAT and isinstance(stores, list) and stores
              and all(isinstance(s, str) and s.startswith("rank-") and "/" not in s
                      and "\\" not in s for s in stores)
              and isinstance(inputs, list) and len(inputs) == len(stores)
              and all(isinstance(n, int) and n >= 0 for n in inputs)
              and isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
              and (ids is None or isinstance(ids, bool)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptStoreError(f"the rank list {path} of a distributed activation store is "
                                f"unreadable ({exc}); delete the store and fit again") from exc
    if not ok:
        raise CorruptStoreError(f"the rank list {path} of a distributed activation store is "
                                "malformed; delete the store and fit again")
    return record
