"""gm.save / GAPA.load: exact round trips, atomic writes, and a typed error for every bad file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import gapa
from conftest import mlp
from gapa import persistence
from gapa.persistence import FORMAT_VERSION, META_KEY, FormatWarning
from gapa.search import NeighbourIndex

FIXTURES = Path(__file__).parent / "fixtures"


def _data(n=600, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    return x, torch.sin(x.sum(1, keepdim=True))


def _fitted(dtype=torch.float32, **options):
    model = mlp([3, 16, 16, 1], seed=1).to(dtype)
    x, y = _data()
    x, y = x.to(dtype), y.to(dtype)
    gm = gapa.GAPA(model, layers=["1", "3"], m=options.pop("m", 64), **options)
    gm.fit(x[:400], progress=False)
    gm.calibrate(x[400:500], y[400:500])
    return gm, model, x[500:]


def _same_outputs(a: gapa.GAPA, b: gapa.GAPA, x: torch.Tensor) -> None:
    out_a, out_b = a(x), b(x)
    assert torch.equal(out_a.mean, out_b.mean)
    assert torch.equal(out_a.var, out_b.var)
    assert out_a.var.abs().sum() > 0


@pytest.mark.parametrize("options", [
    {},
    {"k": 3, "propagation": "jacobian"},
    {"m": None, "search": "faiss"},
    {"m": 32, "conditioning": "exact"},
    {"m": 64, "inducing": "random", "search": "hnsw"},
    {"m": None, "search": "ivf"},
])
def test_round_trip_is_bit_exact(tmp_path, options):
    gm, model, x = _fitted(**options)
    path = gm.save(tmp_path / "state.gapa")
    loaded = gapa.GAPA.load(path, model)
    _same_outputs(gm, loaded, x)
    assert loaded.options() == gm.options()
    assert loaded.calibration == gm.calibration
    assert loaded.lengthscale_factor == gm.lengthscale_factor
    for key, site in gm.sites.items():
        other = loaded.sites[key]
        assert torch.equal(site.rows, other.rows)
        assert torch.equal(site.hyperparameters.lengthscale, other.hyperparameters.lengthscale)
        assert other.cache_size == site.cache_size
    assert torch.equal(gm.predict(x).stddev, loaded.predict(x).stddev)


def test_round_trip_float64_and_map_location(tmp_path):
    gm, model, x = _fitted(dtype=torch.float64)
    gm.save(tmp_path / "s.gapa")
    loaded = gapa.GAPA.load(tmp_path / "s.gapa", model, map_location="cpu")
    assert all(s.rows.dtype == torch.float64 and s.rows.device.type == "cpu"
               for s in loaded.sites.values())
    _same_outputs(gm, loaded, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_map_location_cuda(tmp_path):
    gm, model, x = _fitted()
    gm.save(tmp_path / "s.gapa")
    loaded = gapa.GAPA.load(tmp_path / "s.gapa", model.cuda(), map_location="cuda")
    out = loaded(x.cuda())
    assert torch.equal(out.mean.cpu(), model.cpu()(x))


def test_classifier_calibration_round_trip(tmp_path):
    model = mlp([3, 16, 4], seed=2)
    x, _ = _data()
    labels = model(x).argmax(1)
    gm = gapa.GAPA(model, m=32).fit(x[:400], progress=False)
    gm.calibrate_classifier(x[400:500], labels[400:500])
    gm.save(tmp_path / "c.gapa")
    loaded = gapa.GAPA.load(tmp_path / "c.gapa", model)
    a, b = gm.classify(x[500:]), loaded.classify(x[500:])
    assert torch.equal(a.probs, b.probs)
    assert loaded._class_calibration == gm._class_calibration


def test_unfitted_cannot_save(tmp_path):
    with pytest.raises(gapa.NotFittedError, match="save"):
        gapa.GAPA(mlp([3, 8, 1])).save(tmp_path / "x.gapa")


def test_interrupted_save_keeps_previous_state(tmp_path, monkeypatch):
    gm, model, x = _fitted()
    path = gm.save(tmp_path / "state.gapa")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(persistence, "save_file", crash)
    gm.lengthscale_factor = 2.0
    with pytest.raises(KeyboardInterrupt):
        gm.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["state.gapa"]  # no temporary left behind
    monkeypatch.undo()
    _same_outputs(gapa.GAPA.load(path, model), gapa.GAPA.load(path, model), x)


def test_truncated_file(tmp_path):
    gm, model, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    data = path.read_bytes()
    for cut in (4, 200, len(data) // 2, len(data) - 3):
        path.write_bytes(data[:cut])
        with pytest.raises(gapa.CorruptStateError, match=r"s\.gapa"):
            gapa.GAPA.load(path, model)


def test_flipped_tensor_byte_fails_checksum(tmp_path):
    gm, model, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(gapa.CorruptStateError, match="checksum"):
        gapa.GAPA.load(path, model)


def test_not_a_gapa_file(tmp_path):
    model = mlp([3, 8, 1])
    with pytest.raises(gapa.StateFileError, match="no GAPA state"):
        gapa.GAPA.load(tmp_path / "missing.gapa", model)
    (tmp_path / "noise.gapa").write_bytes(os.urandom(256))
    with pytest.raises(gapa.CorruptStateError, match=r"noise\.gapa"):
        gapa.GAPA.load(tmp_path / "noise.gapa", model)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(gapa.CorruptStateError, match="not a GAPA state"):
        gapa.GAPA.load(tmp_path / "other.safetensors", model)


def _rewrite_metadata(path: Path, edit, sign: bool = False) -> None:
    """Edit the JSON metadata in place; ``sign`` recomputes the checksum (a writer's bug rather
    than a corruption)."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    tensors = load_file(str(path))
    edit(meta)
    if sign:
        meta.pop("checksum")
        meta["checksum"] = persistence._checksum(tensors, meta)
    save_file(tensors, str(path), {META_KEY: json.dumps(meta)})


def test_unknown_format_version(tmp_path):
    gm, model, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    _rewrite_metadata(path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(gapa.FormatVersionError, match=f"format {FORMAT_VERSION + 1}"):
        gapa.GAPA.load(path, model)
    _rewrite_metadata(path, lambda m: m.update(format_version="two"))
    with pytest.raises(gapa.FormatVersionError):
        gapa.GAPA.load(path, model)


def test_malformed_metadata(tmp_path):
    gm, model, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    _rewrite_metadata(path, lambda m: m.update(lengthscale_factor=3.0))
    with pytest.raises(gapa.CorruptStateError, match="checksum"):  # metadata is covered too
        gapa.GAPA.load(path, model)
    _rewrite_metadata(path, lambda m: m.pop("sites"), sign=True)
    with pytest.raises(gapa.CorruptStateError, match="malformed"):
        gapa.GAPA.load(path, model)
    _rewrite_metadata(path, lambda m: m.update(format_version=1))
    with pytest.raises(gapa.CorruptStateError, match="altered"):
        gapa.GAPA.load(path, model)


def test_saved_index_is_restored_not_retrained(tmp_path, monkeypatch):
    gm, model, x = _fitted(m=None, search="ivf")
    path = gm.save(tmp_path / "s.gapa")

    def retrain(self):
        raise AssertionError("the approximate index was retrained on load")

    monkeypatch.setattr(NeighbourIndex, "_build_approximate", retrain)
    loaded = gapa.GAPA.load(path, model)
    assert loaded.sites["1"].index.params == gm.sites["1"].index.params
    _same_outputs(gm, loaded, x)


def test_saved_file_is_readable_by_others(tmp_path):
    gm, _, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_other_architecture(tmp_path):
    gm, _, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    for other in (mlp([3, 16, 16, 16, 1], seed=1), mlp([3, 16, 8, 1], seed=1),
                  mlp([3, 16, 16, 1], seed=1, act=nn.ReLU)):
        with pytest.raises(gapa.ArchitectureMismatchError, match="Sequential"):
            gapa.GAPA.load(path, other)


def test_other_weights(tmp_path):
    gm, model, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    with pytest.raises(gapa.WeightsMismatchError, match="other weights"):
        gapa.GAPA.load(path, mlp([3, 16, 16, 1], seed=7))
    with torch.no_grad():
        model[0].bias[0] += 1e-6  # one weight, barely moved
    with pytest.raises(gapa.WeightsMismatchError):
        gapa.GAPA.load(path, model)


def test_first_format_loads_with_warning():
    """``fixtures/gapa-format1.safetensors`` was written by gapa's first state format (no
    checksum, no saved index) for ``mlp([3, 16, 16, 1], seed=1)`` fitted on ``_data()[0][:400]``
    with m=64 on layers 1 and 3, then calibrated; the expected moments sit beside it."""
    model = mlp([3, 16, 16, 1], seed=1)
    with pytest.warns(FormatWarning, match="format 1"):
        gm = gapa.GAPA.load(FIXTURES / "gapa-format1.safetensors", model)
    expected = load_file(str(FIXTURES / "gapa-format1-expected.safetensors"))
    out = gm(expected["x"])
    with torch.no_grad():
        assert torch.equal(out.mean, model(expected["x"]))
    torch.testing.assert_close(out.var, expected["var"], rtol=1e-6, atol=0)
    assert gm.calibration is not None
