"""Atomic file writes: write aside, then rename, so an interrupted write leaves no half file.

Also the raw bytes of a tensor, for hashing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


def raw_bytes(t: torch.Tensor) -> np.ndarray:
    """Return a tensor's bytes as a flat uint8 array on the CPU, for hashing.

    The bytes are read through uint8, so every dtype works, bfloat16 included, which numpy
    lacks.
    """
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def file_in_the_way(directories) -> str | None:
    """Return "P is a file, not a directory" for the first of ``directories`` that is a file.

    Why a directory could not be made or written into, in words the caller can act on (the
    ``OSError`` of a failed write names a temporary file); None when none is in the way.
    """
    return next((f"{p} is a file, not a directory" for p in map(Path, directories)
                 if p.exists() and not p.is_dir()), None)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``.

    On an error the temporary file is removed and ``path`` is left as it was. The file gets the
    permissions the umask allows, and it and the rename are synced to disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        _fsync(tmp)  # the bytes reach the disk before the name points at them
        os.replace(tmp, path)
        _fsync(path.parent)  # and the rename itself survives a power loss
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
