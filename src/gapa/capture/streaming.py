"""A capture streamed into an activation store.

Shards are written as the cache fills; a resumed capture only hashes the rows of the shards
already on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..errors import StoreMismatchError
from .inputs import check_finite
from .store import ActivationStore, Shard


def stream_to_store(run: Callable[[torch.Tensor], object], batches: Iterable[torch.Tensor],
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
    batches : iterable of torch.Tensor
        The checked training batches, in the order of the first pass.
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
            shard.add(x[:need])
            x = x[need:]
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
                      digest=shard.digest.hexdigest())
