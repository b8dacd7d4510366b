"""Cached pre-activations on disk: shards of rows per call site, read back in bounded memory.

``GAPA.fit(loader, store=path)`` streams the training activations batch by batch into a store,
so the cache may be larger than memory. Every shard is written aside and renamed, and the
manifest lists only finished shards with a digest of the inputs that produced them: a capture
that was interrupted resumes at the first unfinished shard when called again with the same
store and the same data in the same order, and refuses (:class:`gapa.errors.StoreMismatchError`) when
the model, the layers or the data differ.

A capture holds an exclusive lock file in the store (:class:`gapa.errors.StoreLockedError` for a second
one), and the manifest records every shard file's size, shape and SHA-256, checked before the
file is first read (:class:`gapa.errors.CorruptStoreError`): a modified, truncated or swapped shard
never reaches the GPs.

Reads never map more than one shard at a time, so the resident memory of a fit from a store is
bounded by a few shards (:data:`SHARD_BYTES` each) plus what the fit keeps (M inducing points).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import (
    ConfigurationError,
    CorruptStoreError,
    NonFiniteError,
    StateFileError,
    StoreLockedError,
    StoreMismatchError,
)
from ..io import atomic_path, file_in_the_way

#: Bytes of cached rows (all call sites together, float32) a shard holds: what a capture keeps
#: in memory before writing, and at most what a read maps at once.
SHARD_BYTES = 64 << 20
#: 2: every shard file's byte size and SHA-256 are in the manifest (1 had no checksums).
STORE_FORMAT = 2
MANIFEST = "manifest.json"
#: The lock file a capture holds: JSON ``{"pid": ..., "host": ...}`` of its process.
LOCK = "capture.lock"
#: The dtypes a store keeps rows in: float32, or float16 to halve the disk and read cost.
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}
_HASH_BLOCK = 1 << 20


class StoredRows:
    """One call site's cached rows (N x d) across the shards of a store, read on demand.

    Rows come back in the dtype and on the device the model computed them in. Each shard file
    is checked against its manifest entry (size, header, SHA-256) the first time it is read,
    then trusted.

    Parameters
    ----------
    root : Path or list of Path
        The store's directory, or one directory per shard (the rows of several stores read as
        one, as a fit across the ranks of a process group reads every rank's store).
    shards : list of dict
        The site's manifest entries, one per shard, in order.
    width : int
        The site's units (``d``).
    file_dtype : str
        The dtype the store keeps rows in (a key of :data:`STORE_DTYPES`).
    dtype : torch.dtype
        The dtype rows are returned in.
    device : torch.device
        The device rows are returned on.
    """

    def __init__(self, root: Path | list[Path], shards: list[dict], width: int, file_dtype: str,
                 dtype: torch.dtype, device: torch.device):
        self.roots = ([Path(r) for r in root] if isinstance(root, (list, tuple))
                      else [Path(root)] * len(shards))
        if len(self.roots) != len(shards):
            raise ValueError(f"{len(self.roots)} directories for {len(shards)} shards")
        self.shards, self.file_dtype = shards, file_dtype
        self.sizes = [s["rows"] for s in shards]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.width, self.dtype, self.device = width, dtype, device
        self._verified: set[tuple[Path, str]] = set()

    @property
    def paths(self) -> list[Path]:
        """The shard files, in order."""
        return [root / s["file"] for root, s in zip(self.roots, self.shards, strict=True)]

    def __len__(self) -> int:
        """Return the number of rows, N."""
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        """The shape ``(N, d)`` of the rows."""
        return len(self), self.width

    def _path(self, shard: int) -> Path:
        """Return the shard's file, verified once per object (hashing reads the whole file)."""
        spec, root = self.shards[shard], self.roots[shard]
        if (root, spec["file"]) in self._verified:
            return root / spec["file"]
        path = verify_shard(root, spec, self.file_dtype)
        self._verified.add((root, spec["file"]))
        return path

    def _read(self, shard: int, rows=None) -> torch.Tensor:
        path = self._path(shard)
        try:
            array = np.load(path, mmap_mode="r")
            part = np.array(array if rows is None else array[rows])  # a copy; the map is released
        except (OSError, ValueError) as exc:  # changed since it was verified
            raise CorruptStoreError(f"the activation-store shard {path} cannot be read "
                                    f"({exc}); delete the store and capture again") from exc
        del array
        return torch.from_numpy(part).to(device=self.device, dtype=self.dtype)

    def chunks(self) -> Iterator[torch.Tensor]:
        """Yield the rows, one shard at a time, in order.

        Raises
        ------
        CorruptStoreError
            A shard fails its manifest check or cannot be read.
        """
        for shard in range(len(self.shards)):
            yield self._read(shard)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        """Return the rows at the given indices, in that order.

        Parameters
        ----------
        idx : Tensor
            Row numbers (any shape, read flattened; integer).

        Returns
        -------
        Tensor
            The rows (len(idx) x d), in the rows' dtype and on their device.

        Raises
        ------
        CorruptStoreError
            A shard read fails its manifest check or cannot be read.
        """
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
        """Return all rows in one tensor (the whole cache in memory).

        Raises
        ------
        CorruptStoreError
            A shard fails its manifest check or cannot be read.
        """
        return torch.cat(list(self.chunks())) if self.shards else torch.empty(
            0, self.width, dtype=self.dtype, device=self.device)


class ActivationStore:
    """A directory of per-site shards (``.npy``) and a JSON manifest of the finished ones.

    :meth:`open` takes the store's lock; :meth:`close` (or leaving a ``with`` block) releases it.

    Parameters
    ----------
    path : str or os.PathLike
        The store's directory (created by :meth:`open`).
    dtype : {"float32", "float16"}
        The dtype rows are kept in on disk.
    shard_rows : int, optional
        Rows per shard; None sizes shards by :data:`SHARD_BYTES` (see :meth:`rows_per_shard`).

    Raises
    ------
    ConfigurationError
        For an unknown ``dtype``, or a ``shard_rows`` that is not a positive integer.
    """

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
        self._lock: dict | None = None  # the lock file's contents while this object holds it

    def __enter__(self) -> ActivationStore:
        """Return the store itself; the lock is taken by :meth:`open`."""
        return self

    def __exit__(self, *exc) -> None:
        """Release the lock (:meth:`close`); an exception passes on."""
        self.close()

    # --- writing ------------------------------------------------------------------------------

    def open(self, signature: dict) -> list[dict]:
        """Lock the store and start or resume a capture for ``signature``.

        Temporary files of interrupted writes are removed. On any error the lock is released.

        Parameters
        ----------
        signature : dict
            What the capture is of (model fingerprint, layers, queries), JSON-safe. A store
            already on disk must have been written for the same signature and dtype.

        Returns
        -------
        list of dict
            The manifest entries of the shards already finished (none for a new store).

        Raises
        ------
        StoreLockedError
            Another live capture holds the store's lock, or its lock file names no owner.
        StoreMismatchError
            The store on disk was written for another signature or dtype, or in another format.
        CorruptStoreError
            The manifest is unreadable or malformed.
        StateFileError
            The store's directory or its lock file cannot be created (a file in the way,
            permissions, a read-only file system).
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            where = file_in_the_way((self.path, *self.path.parents))
            raise StateFileError(
                f"cannot create the activation store {self.path}: "
                f"{where or exc.strerror or exc}; give store= a directory this process can "
                "write") from exc
        self._acquire()
        try:
            # temporaries of killed writes; under the lock no live writer has any here
            for tmp in self.path.glob("*.tmp"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
            if (self.path / MANIFEST).exists():
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
                self.manifest = {"format": STORE_FORMAT, "dtype": self.dtype,
                                 "signature": signature, "shards": [], "complete": False}
                self._save_manifest()
        except BaseException:
            self.close()
            raise
        return list(self.manifest["shards"])

    def read(self) -> ActivationStore:
        """Load the manifest without taking the lock, to read a store another process wrote.

        The dtype becomes the store's own. For the finished stores of the other ranks of a
        fit across a process group (:mod:`gapa.capture.distributed`), which nothing writes
        any more; a capture goes through :meth:`open`.

        Returns
        -------
        ActivationStore
            This store, its manifest loaded.

        Raises
        ------
        CorruptStoreError
            The manifest is missing, unreadable or malformed.
        StoreMismatchError
            The store is in another format.
        """
        self.manifest = self._load_manifest()
        self.dtype = self.manifest["dtype"]
        return self

    def close(self) -> None:
        """Release the lock if this object holds it (idempotent).

        A lock file that is no longer this object's (deleted and taken by another capture) is
        left alone.
        """
        token, self._lock = self._lock, None
        if token is None:
            return
        lock = self.path / LOCK
        try:
            if _read_lock(lock) == token:
                lock.unlink()
        except (StoreLockedError, OSError):
            pass  # gone or replaced: not ours to remove

    def _acquire(self) -> None:
        """Create the lock file (O_CREAT|O_EXCL); take over one whose process is gone."""
        if self._lock is not None:
            return
        lock = self.path / LOCK
        token = {"pid": os.getpid(), "host": socket.gethostname(), "token": secrets.token_hex(8)}
        for _ in range(5):  # another process may take over the same stale lock at once
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                fd = None
            except OSError as exc:
                raise StateFileError(f"cannot create the lock file {lock} of the activation "
                                     f"store {self.path} ({exc})") from exc
            if fd is not None:
                with os.fdopen(fd, "w") as f:
                    json.dump(token, f)
                self._lock = token
                return
            owner = _read_lock(lock)
            if owner is None:  # released meanwhile
                continue
            self._refuse_unless_stale(lock, owner)
            warnings.warn(f"taking over the stale lock {lock} of process {owner['pid']}, which "
                          f"no longer runs on {owner['host']} (an earlier capture was killed)",
                          stacklevel=3)
            if _read_lock(lock) == owner:  # not taken over by another process meanwhile
                lock.unlink(missing_ok=True)
        raise StoreLockedError(f"could not lock the activation store {self.path}: its lock "
                               f"file {lock} keeps changing hands; retry")

    def _refuse_unless_stale(self, lock: Path, owner: dict) -> None:
        pid, host = owner["pid"], owner["host"]
        if host != socket.gethostname():
            why = (f"process {pid} on another host, {host}, which gapa cannot check from here; if "
                   f"no capture into this store runs there, delete {lock} and retry")
        elif pid == os.getpid():
            why = (f"this process (pid {pid}): another ActivationStore on this directory was "
                   "opened and not closed; close() it first, or use `with ActivationStore(...)`")
        elif _pid_alive(pid):
            why = (f"process {pid} on this host, which is still running: wait for its capture "
                   "to finish or use another store path; if that process is not capturing "
                   f"(its pid was reused), delete {lock} and retry")
        else:
            return
        raise StoreLockedError(f"the activation store {self.path} is locked (lock file {lock}) "
                               f"by {why}")

    def rows_per_shard(self, total_width: int) -> int:
        """Return the rows per shard for call sites of ``total_width`` units together.

        That is ``shard_rows`` if given, else :data:`SHARD_BYTES` worth of float32 rows (at
        least one).
        """
        return self.shard_rows or max(1, SHARD_BYTES // (4 * total_width))

    def write_shard(self, rows: dict[str, torch.Tensor], *, batches: int, inputs: int,
                    digest: str) -> None:
        """Append one shard: every site's rows, then the manifest entry that makes it count.

        The entry records the size and SHA-256 of the bytes written, which every read checks.

        Parameters
        ----------
        rows : dict of str to Tensor
            Each call site's rows (n x d) in this shard.
        batches, inputs : int
            How many batches and inputs the rows were captured from.
        digest : str
            The digest of those inputs (:class:`gapa.capture.streaming.Shard`), checked when a
            capture resumes.

        Raises
        ------
        NonFiniteError
            A value's magnitude exceeds the largest the store's dtype holds (infinities
            included): the cast would store it as inf.
        """
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
                out = _HashingWriter(f)
                np.save(out, array)
            entry["sites"][key] = {"file": name, "rows": int(array.shape[0]),
                                   "width": int(array.shape[1]),
                                   "dtype": str(value.dtype).removeprefix("torch."),
                                   "bytes": out.size, "sha256": out.sha256.hexdigest()}
        self.manifest["shards"].append(entry)
        self._save_manifest()

    def finish(self, input_shape: tuple[int, ...], input_ids: bool | None = None) -> None:
        """Mark the capture complete (the lock stays held until :meth:`close`).

        Parameters
        ----------
        input_shape : tuple of int
            The shape of one training input (without the batch axis), kept in the manifest.
        input_ids : bool or None, default None
            Whether the training inputs were integer ids, kept in the manifest.
        """
        self.manifest["complete"] = True
        self.manifest["input_shape"] = list(input_shape)
        self.manifest["input_ids"] = input_ids
        self._save_manifest()

    # --- reading ------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Whether the capture was marked complete (:meth:`finish`)."""
        return bool(self.manifest.get("complete"))

    @property
    def keys(self) -> list[str]:
        """The call sites, in the order they were first cached."""
        shards = self.manifest.get("shards", [])
        return list(dict.fromkeys(k for s in shards for k in s["sites"]))

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The shape of one training input that :meth:`finish` recorded, else None."""
        shape = self.manifest.get("input_shape")
        return None if shape is None else tuple(shape)

    @property
    def input_ids(self) -> bool | None:
        """Whether the training inputs were integer ids, as :meth:`finish` recorded them.

        None where the manifest does not say.
        """
        return self.manifest.get("input_ids")

    def rows(self, key: str, device: torch.device | str = "cpu") -> StoredRows:
        """Return one call site's rows, read on demand.

        Parameters
        ----------
        key : str
            The call site (one of :attr:`keys`).
        device : torch.device or str
            Where the rows are returned; their dtype is the one the model computed them in.

        Returns
        -------
        StoredRows
        """
        shards = [s["sites"][key] for s in self.manifest["shards"] if key in s["sites"]]
        return StoredRows(self.path, shards, shards[0]["width"], self.manifest["dtype"],
                          getattr(torch, shards[0]["dtype"]), torch.device(device))

    def n_rows(self, key: str) -> int:
        """Return how many rows the finished shards hold for call site ``key``."""
        return sum(s["sites"][key]["rows"] for s in self.manifest["shards"] if key in s["sites"])

    def _load_manifest(self) -> dict:
        path = self.path / MANIFEST
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptStoreError(f"the activation-store manifest {path} is unreadable "
                                    f"({exc}); delete the store to capture again") from exc
        _check_manifest(manifest, path)
        return manifest

    def _save_manifest(self) -> None:
        with atomic_path(self.path / MANIFEST) as tmp, open(tmp, "w") as f:
            json.dump(self.manifest, f, indent=1)


class _HashingWriter:
    """A write-only file wrapper that counts and hashes what passes through it.

    ``np.save`` writes through ``write`` when given an object that is not a real file.
    """

    def __init__(self, f):
        self.f, self.size, self.sha256 = f, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self.f.write(data)


def verify_shard(root: Path, spec: dict, file_dtype: str) -> Path:
    """Check the shard file ``spec`` names in the store ``root`` and return its path.

    The file must be a regular file of the store with the recorded size, ``.npy`` shape and
    dtype, and SHA-256.

    Parameters
    ----------
    root : Path
        The store's directory.
    spec : dict
        The shard's manifest entry for one site (``file``, ``rows``, ``width``, ``bytes``,
        ``sha256``).
    file_dtype : str
        The store's dtype (a key of :data:`STORE_DTYPES`).

    Returns
    -------
    Path
        The shard's file.

    Raises
    ------
    CorruptStoreError
        The name is not a plain file name, or the file resolves outside the store, is missing
        or unreadable, or differs from its manifest entry.
    """
    name = spec["file"]
    _check_file_name(name, root / MANIFEST)
    path = root / name
    if path.resolve().parent != root.resolve():
        raise CorruptStoreError(f"the activation-store shard {path} resolves outside the store "
                                f"{root} (a link?); delete the store and capture again")

    def corrupt(what: str) -> CorruptStoreError:
        return CorruptStoreError(f"the activation-store shard {path} {what}; the store is "
                                 "damaged: delete it and capture again")

    try:
        size = path.stat().st_size
        if not path.is_file():
            raise corrupt("is not a regular file")
        if size != spec["bytes"]:
            raise corrupt(f"is {size} bytes, the manifest records {spec['bytes']} (truncated "
                          "or replaced)")
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
            except ValueError as exc:
                raise corrupt(f"is not a readable .npy file ({exc})") from exc
            want = (spec["rows"], spec["width"])
            if shape != want or dtype != np.dtype(STORE_DTYPES[file_dtype]) or fortran:
                raise corrupt(f"holds {dtype} {shape}, the manifest records {file_dtype} {want}")
            f.seek(0)
            digest = hashlib.sha256()
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    except CorruptStoreError:
        raise
    except FileNotFoundError as exc:
        raise corrupt("is missing") from exc
    except OSError as exc:
        raise corrupt(f"cannot be read ({exc})") from exc
    if digest.hexdigest() != spec["sha256"]:
        raise corrupt("does not match the SHA-256 the manifest records: it was modified")
    return path


def _check_file_name(name, manifest: Path) -> None:
    """Refuse a shard name that is not a plain file name: no separators, ``..`` or drive."""
    if (not isinstance(name, str) or name in ("", ".", "..")
            or any(c in name for c in "/\\:\0")):
        raise CorruptStoreError(f"the activation-store manifest {manifest} names the shard file "
                                f"{name!r}, which is not a plain file name inside the store; "
                                "delete the store and capture again")


def _check_manifest(manifest, path: Path) -> None:
    """Raise a typed error naming ``path`` unless ``manifest`` is a well-formed current one."""
    def bad(what: str) -> CorruptStoreError:
        return CorruptStoreError(f"the activation-store manifest {path} is malformed: {what}; "
                                 "delete the store and capture again")

    def count(value, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    if manifest.get("format") != STORE_FORMAT:
        raise StoreMismatchError(
            f"the activation store {path.parent} is format {manifest.get('format')!r} ({path}); "
            f"this gapa reads format {STORE_FORMAT} only, whose manifest checks every shard's "
            "size and SHA-256: delete the store directory and capture again (a store is a cache)")
    if manifest.get("dtype") not in STORE_DTYPES:
        raise bad(f"dtype {manifest.get('dtype')!r} is not one of {list(STORE_DTYPES)}")
    if not isinstance(manifest.get("signature"), dict):
        raise bad("'signature' is not an object")
    shards, complete = manifest.get("shards"), manifest.get("complete")
    if not isinstance(shards, list):
        raise bad("'shards' is not a list")
    if not isinstance(complete, bool):
        raise bad("'complete' is not true or false")
    if complete and not shards:
        raise CorruptStoreError(f"the activation-store manifest {path} is marked complete but "
                                "lists no shards: delete the store and capture again")
    shape = manifest.get("input_shape")
    if (complete or shape is not None) and not (
            isinstance(shape, list) and all(count(n, 0) for n in shape)):
        raise bad(f"'input_shape' {shape!r} is not a list of sizes")
    ids = manifest.get("input_ids")  # absent from manifests written before it
    if not (ids is None or isinstance(ids, bool)):
        raise bad(f"'input_ids' {ids!r} is not true, false or null")
    sites_seen: dict[str, tuple] = {}
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise bad(f"shard {i} is not an object")
        if not (count(shard.get("batches"), 1) and count(shard.get("inputs"), 1)):
            raise bad(f"shard {i} has no positive 'batches' and 'inputs' counts")
        if not isinstance(shard.get("digest"), str) or not isinstance(shard.get("sites"), dict):
            raise bad(f"shard {i} lacks its 'digest' or 'sites'")
        for key, site in shard["sites"].items():
            where = f"shard {i}, site {key!r}"
            if not isinstance(site, dict):
                raise bad(f"{where} is not an object")
            _check_file_name(site.get("file"), path)
            if not (count(site.get("rows"), 0) and count(site.get("width"), 1)
                    and count(site.get("bytes"), 0)):
                raise bad(f"{where} has no valid 'rows', 'width' and 'bytes' counts")
            dtype = site.get("dtype")
            if not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)
                    and getattr(torch, dtype).is_floating_point):
                raise bad(f"{where} has dtype {dtype!r}, not a torch floating dtype")
            sha = site.get("sha256")
            if not (isinstance(sha, str) and len(sha) == 64
                    and all(c in "0123456789abcdef" for c in sha)):
                raise bad(f"{where} has no SHA-256")
            if sites_seen.setdefault(key, (site["width"], dtype)) != (site["width"], dtype):
                raise bad(f"{where} has width {site['width']} and dtype {dtype}, unlike the "
                          "site's earlier shards")


def _read_lock(lock: Path) -> dict | None:
    """Return the lock file's owner (``pid``, ``host``), or None if there is no lock file.

    A lock file that cannot be read, or names no owner, raises :class:`StoreLockedError`.
    """
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreLockedError(f"cannot read the activation-store lock file {lock} ({exc})") from exc
    try:
        owner = json.loads(text)
        if (isinstance(owner, dict) and isinstance(owner.get("host"), str)
                and type(owner.get("pid")) is int and owner["pid"] > 0):
            return owner
    except json.JSONDecodeError:
        pass
    raise StoreLockedError(
        f"the activation-store lock file {lock} does not name its owner ({text[:80]!r}): a "
        "capture may be starting; if no capture into this store is running, delete it and retry")


def _pid_alive(pid: int) -> bool:
    """Return whether process ``pid`` exists on this host (True where that can't be checked)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _file_key(key: str) -> str:
    """Return a call-site key as a file name: its safe characters and a digest of the key.

    Module paths have dots and repeated calls ``#``, and two keys may differ only in those.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
