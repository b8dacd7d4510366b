"""Cached pre-activations on disk: shards of rows per call site, read back in bounded memory.

``GAPA.fit(loader, store=path)`` streams the training activations batch by batch into a store,
so the cache may be larger than memory. Every shard is written aside and renamed, and the
manifest lists only finished shards with a digest of the inputs that produced them: a capture
that was interrupted resumes at the first unfinished shard when called again with the same
store and the same data in the same order, and refuses (:class:`gapa.StoreMismatchError`) when
the model, the layers or the data differ.

Reads never map more than one shard at a time, so the resident memory of a fit from a store is
bounded by a few shards (:data:`SHARD_BYTES` each) plus what the fit keeps (M inducing points).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigurationError, NonFiniteError, StoreMismatchError
from .io import atomic_path, raw_bytes

#: Bytes of cached rows (all call sites together, float32) a shard holds: what a capture keeps
#: in memory before writing, and at most what a read maps at once.
SHARD_BYTES = 64 << 20
STORE_FORMAT = 1
MANIFEST = "manifest.json"
#: The dtypes a store keeps rows in: float32, or float16 to halve the disk and read cost.
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


class StoredRows:
    """One call site's cached rows (N x d) across the shards of a store, read on demand in the
    dtype and on the device the model computed them in."""

    def __init__(self, paths: list[Path], sizes: list[int], width: int, dtype: torch.dtype,
                 device: torch.device, divisor: torch.Tensor | None = None):
        self.paths, self.sizes = paths, sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.width, self.dtype, self.device = width, dtype, device
        self.divisor = divisor

    def scaled(self, divisor: torch.Tensor) -> StoredRows:
        """The same rows divided by ``divisor`` (per unit) as they are read."""
        return StoredRows(self.paths, self.sizes, self.width, self.dtype, self.device, divisor)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.width

    def _read(self, shard: int, rows=None) -> torch.Tensor:
        array = np.load(self.paths[shard], mmap_mode="r")
        part = np.array(array if rows is None else array[rows])  # a copy; the map is released
        del array
        rows = torch.from_numpy(part).to(device=self.device, dtype=self.dtype)
        return rows if self.divisor is None else rows / self.divisor

    def chunks(self) -> Iterator[torch.Tensor]:
        """The rows, one shard at a time, in order."""
        for shard in range(len(self.paths)):
            yield self._read(shard)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows at the given indices (a 1-D integer tensor), in that order."""
        idx = torch.as_tensor(idx).reshape(-1).cpu().numpy()
        out = torch.empty(len(idx), self.width, dtype=self.dtype, device=self.device)
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            local = idx[where] - self.offsets[shard]
            order = np.argsort(local)  # sorted reads from the memory map
            rows = self._read(int(shard), local[order])
            out[torch.from_numpy(where[order]).to(self.device)] = rows
        return out

    def materialize(self) -> torch.Tensor:
        """All rows in one tensor (the whole cache in memory)."""
        return torch.cat(list(self.chunks())) if self.paths else torch.empty(
            0, self.width, dtype=self.dtype, device=self.device)


class ActivationStore:
    """A directory of per-site shards (``.npy``) and a JSON manifest of the finished ones."""

    def __init__(self, path: str | os.PathLike, dtype: str = "float32",
                 shard_rows: int | None = None):
        if dtype not in STORE_DTYPES:
            raise ConfigurationError(f"store dtype must be one of {list(STORE_DTYPES)}, got {dtype!r}")
        if shard_rows is not None and (not isinstance(shard_rows, int) or shard_rows < 1):
            raise ConfigurationError(f"shard_rows must be a positive integer, got {shard_rows!r}")
        self.path = Path(path)
        self.dtype = dtype
        self.shard_rows = shard_rows
        self.manifest: dict = {}

    # --- writing ------------------------------------------------------------------------------

    def open(self, signature: dict) -> list[dict]:
        """Start or resume a capture for ``signature`` (model fingerprint, layers, queries):
        returns the finished shards, or raises StoreMismatchError when the store on disk was
        written for something else."""
        path = self.path / MANIFEST
        if path.exists():
            manifest = self._load_manifest()
            mismatch = [k for k, v in signature.items() if manifest["signature"].get(k) != v]
            if manifest["dtype"] != self.dtype:
                mismatch.append(f"dtype ({manifest['dtype']} on disk, {self.dtype} asked)")
            if mismatch:
                raise StoreMismatchError(
                    f"the activation store {self.path} was written for another "
                    f"{', '.join(mismatch)}; use a new store path or delete this one")
            self.manifest = manifest
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": STORE_FORMAT, "dtype": self.dtype, "signature": signature,
                             "shards": [], "complete": False}
            self._save_manifest()
        return list(self.manifest["shards"])

    def rows_per_shard(self, total_width: int) -> int:
        """Rows per shard for call sites of ``total_width`` units together: ``shard_rows`` if
        given, else :data:`SHARD_BYTES` worth of float32 rows."""
        return self.shard_rows or max(1, SHARD_BYTES // (4 * total_width))

    def write_shard(self, rows: dict[str, torch.Tensor], *, batches: int, inputs: int,
                    digest: str) -> None:
        """Append one shard: every site's rows, then the manifest entry that makes it count."""
        index = len(self.manifest["shards"])
        entry = {"batches": batches, "inputs": inputs, "digest": digest, "sites": {}}
        for key, value in rows.items():
            name = f"{_file_key(key)}-{index:05d}.npy"  # _file_key is unique per key
            limit = float(np.finfo(STORE_DTYPES[self.dtype]).max)
            if float(value.abs().max()) > limit:  # the cast would store them as inf
                raise NonFiniteError(
                    f"the pre-activations at {key!r} exceed {self.dtype}'s range (max "
                    f"{float(value.abs().max()):.3g} > {limit:.6g}); use store_dtype='float32'")
            # through float32 in torch: numpy has no bfloat16
            array = value.detach().to("cpu", torch.float32).numpy().astype(
                STORE_DTYPES[self.dtype], copy=False)
            with atomic_path(self.path / name) as tmp, open(tmp, "wb") as f:
                np.save(f, array)
            entry["sites"][key] = {"file": name, "rows": int(array.shape[0]),
                                   "width": int(array.shape[1]),
                                   "dtype": str(value.dtype).removeprefix("torch.")}
        self.manifest["shards"].append(entry)
        self._save_manifest()

    def finish(self, input_shape: tuple[int, ...]) -> None:
        self.manifest["complete"] = True
        self.manifest["input_shape"] = list(input_shape)
        self._save_manifest()

    # --- reading ------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def keys(self) -> list[str]:
        """The call sites, in the order they were first cached."""
        shards = self.manifest.get("shards", [])
        return list(dict.fromkeys(k for s in shards for k in s["sites"]))

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        shape = self.manifest.get("input_shape")
        return None if shape is None else tuple(shape)

    def rows(self, key: str, device: torch.device | str = "cpu") -> StoredRows:
        """One site's rows, read back in the dtype the model computed them in, on ``device``."""
        shards = [s["sites"][key] for s in self.manifest["shards"] if key in s["sites"]]
        dtype = getattr(torch, shards[0]["dtype"])
        return StoredRows([self.path / s["file"] for s in shards], [s["rows"] for s in shards],
                          shards[0]["width"], dtype, torch.device(device))

    def n_rows(self, key: str) -> int:
        return sum(s["sites"][key]["rows"] for s in self.manifest["shards"] if key in s["sites"])

    def _load_manifest(self) -> dict:
        try:
            with open(self.path / MANIFEST) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreMismatchError(f"{self.path / MANIFEST} is unreadable ({exc}); delete "
                                     "the store to capture again") from exc
        if manifest.get("format") != STORE_FORMAT:
            raise StoreMismatchError(f"{self.path} is activation-store format "
                                     f"{manifest.get('format')!r}; this gapa writes {STORE_FORMAT}")
        return manifest

    def _save_manifest(self) -> None:
        with atomic_path(self.path / MANIFEST) as tmp, open(tmp, "w") as f:
            json.dump(self.manifest, f, indent=1)


def _file_key(key: str) -> str:
    """A call-site key as a file name: its safe characters and a digest of the whole key (module
    paths have dots, repeated calls ``#``, and two keys may differ only in those)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


class Shard:
    """The inputs of one store shard: how many batches and rows, and a digest of their bytes
    (what tells a resumed capture that the data did not change, whatever its batch size)."""

    def __init__(self):
        self.digest = hashlib.blake2b(digest_size=16)
        self.batches = 0
        self.inputs = 0

    def add(self, x: torch.Tensor) -> None:
        self.digest.update(raw_bytes(x))
        self.batches += 1
        self.inputs += x.shape[0]

    def check(self, entry: dict, index: int, store: ActivationStore) -> None:
        if self.digest.hexdigest() != entry["digest"] or self.inputs != entry["inputs"]:
            raise StoreMismatchError(
                f"the inputs of shard {index} differ from those that wrote it to {store.path} "
                f"({entry['inputs']} inputs): the data or its order (a shuffling DataLoader?) "
                "changed; resume with the same data in the same order, or use a new store")
