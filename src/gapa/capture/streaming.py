"""A capture streamed into an activation store.

Shards are written as the cache fills; a resumed capture only hashes the rows of the shards
already on disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch

from ..errors import StoreMismatchError
from ..io import raw_bytes
from .inputs import Batch, check_finite, has_batch_axis
from .store import ActivationStore


def stream_to_store(run: Callable[[Batch], object], batches: Iterable[Batch],
                    cache: dict[str, list[torch.Tensor]], store: ActivationStore,
                    finished: list[dict]) -> None:
    """Run the model over ``batches`` while the caller's capture hooks fill ``cache``.

    Every time a site's cache reaches the store's shard size, the cache is written as a shard.
    The first ``len(finished)`` shards are on disk already: their inputs are only hashed and
    checked, without running the model (a batch straddling the last one's end is split, so the
    batch size may differ from the first pass).

    Parameters
    ----------
    run : callable
        Runs the network, under the caller's capture hooks, on a batch.
    batches : iterable of Batch
        The checked training batches (tensors or named inputs), in the order of the first pass.
    cache : dict
        Where the hooks append each site's rows; emptied as shards are written.
    store : ActivationStore
        The open store.
    finished : list of dict
        The manifest entries of the shards already on disk.

    Raises
    ------
    StoreMismatchError
        The data differ from those the finished shards were written from.
    NonFiniteError
        The cached pre-activations hold NaN or Inf.
    """
    shard = Shard()
    done = 0  # shards of this pass over the data that are on disk
    limit = None  # rows per shard, once the sites' widths are known
    for x in batches:
        # rows of shards on disk already are only hashed; a batch that straddles the
        # last one's end is split, so the batch size may differ from the first pass
        while done < len(finished) and len(x):
            need = finished[done]["inputs"] - shard.inputs
            shard.add(x.rows(0, need))
            x = x.rows(need)
            if shard.inputs == finished[done]["inputs"]:
                shard.check(finished[done], done, store)
                shard, done = Shard(), done + 1
        if not len(x):
            continue
        shard.add(x)
        run(x)
        if limit is None:
            limit = store.rows_per_shard(sum(c[0].shape[1] for c in cache.values()))
        if max(sum(len(c) for c in chunks) for chunks in cache.values()) >= limit:
            _write_shard(store, cache, shard)
            shard, done = Shard(), done + 1
    if done < len(finished):
        raise StoreMismatchError(
            f"the data ended inside shard {done} of {store.path}, which was written from "
            "more batches: the data changed; resume with the same data or use a new store")
    if shard.batches:
        _write_shard(store, cache, shard)


def _write_shard(store: ActivationStore, cache: dict, shard: Shard) -> None:
    """Write the cached rows of every site as one shard (checked finite) and empty the cache."""
    rows = {key: torch.cat(cache.pop(key)) for key in list(cache)}
    for key, value in rows.items():
        check_finite(value, f"the pre-activations cached at {key!r}", store.n_rows(key))
    store.write_shard(rows, batches=shard.batches, inputs=shard.inputs,
                      digest=shard.hexdigest())


class Shard:
    """The inputs of one store shard: how many batches and rows, and a digest of their bytes.

    The digest tells a resumed capture that the data did not change, whatever its batch size:
    a tensor's rows are hashed in order; named inputs are hashed name by name (each batched
    tensor's rows in order; a value without the batch axis once per shard).
    """

    def __init__(self):
        self.digest = _blake()
        self.named: dict = {}  # name -> digest of named inputs
        self.batches = 0
        self.inputs = 0

    def add(self, x: Batch) -> None:
        """Count the batch ``x`` and add its bytes to the digest."""
        if x.named:
            for name, value in x.inputs.items():
                if has_batch_axis(value, len(x)):
                    self.named.setdefault(name, _blake()).update(raw_bytes(value))
                else:  # the same for every row: the last batch's stands for the shard
                    self.named[name] = _blake(raw_bytes(value) if isinstance(value, torch.Tensor)
                                              else repr(value).encode())
        else:
            self.digest.update(raw_bytes(x.inputs))
        self.batches += 1
        self.inputs += len(x)

    def hexdigest(self) -> str:
        """Return the digest of every input added: a tensor's, or the names' and theirs."""
        if not self.named:
            return self.digest.hexdigest()
        whole = _blake()
        for name in sorted(self.named):
            whole.update(name.encode())
            whole.update(self.named[name].digest())
        return whole.hexdigest()

    def check(self, entry: dict, index: int, store: ActivationStore) -> None:
        """Refuse a resumed shard whose inputs differ from those that wrote it.

        Parameters
        ----------
        entry : dict
            The shard's manifest entry.
        index : int
            The shard's position in the store (for the message).
        store : ActivationStore
            The store (for the message).

        Raises
        ------
        StoreMismatchError
            The digest or the number of inputs differs: the data or its order changed.
        """
        if self.hexdigest() != entry["digest"] or self.inputs != entry["inputs"]:
            raise StoreMismatchError(
                f"the inputs of shard {index} differ from those that wrote it to {store.path} "
                f"({entry['inputs']} inputs): the data or its order (a shuffling DataLoader?) "
                "changed; resume with the same data in the same order, or use a new store")


def _blake(data=b""):
    return hashlib.blake2b(data, digest_size=16)
