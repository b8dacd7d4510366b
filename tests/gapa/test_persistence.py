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
from gapa import persistence
from gapa.gp.search import NeighbourIndex
from gapa.persistence import FORMAT_VERSION, META_KEY, FormatWarning
from helpers import mlp

FIXTURES = Path(__file__).parents[1] / "fixtures"


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
    {"lengthscale_rule": "marginal_likelihood", "amplitude_rule": "marginal_likelihood"},
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
    assert loaded.class_calibration == gm.class_calibration


def test_unfitted_cannot_save(tmp_path):
    with pytest.raises(gapa.NotFittedError, match="save"):
        gapa.GAPA(mlp([3, 8, 1])).save(tmp_path / "x.gapa")


def test_save_to_a_directory_is_refused_by_name(tmp_path):
    gm, model, x = _fitted()
    (tmp_path / "sub").mkdir()
    with pytest.raises(gapa.StateFileError, match=r"is a directory.*model\.gapa"):
        gm.save(tmp_path / "sub")
    assert sorted(os.listdir(tmp_path)) == ["sub"] and not os.listdir(tmp_path / "sub")
    _same_outputs(gm, gapa.GAPA.load(gm.save(tmp_path / "sub" / "model.gapa"), model), x)


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
        with pytest.raises(gapa.errors.CorruptStateError, match=r"s\.gapa"):
            gapa.GAPA.load(path, model)


def test_flipped_tensor_byte_fails_checksum(tmp_path):
    gm, model, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(gapa.errors.CorruptStateError, match="checksum"):
        gapa.GAPA.load(path, model)


def test_not_a_gapa_file(tmp_path):
    model = mlp([3, 8, 1])
    with pytest.raises(gapa.StateFileError, match="no GAPA state"):
        gapa.GAPA.load(tmp_path / "missing.gapa", model)
    (tmp_path / "noise.gapa").write_bytes(os.urandom(256))
    with pytest.raises(gapa.errors.CorruptStateError, match=r"noise\.gapa"):
        gapa.GAPA.load(tmp_path / "noise.gapa", model)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(gapa.errors.CorruptStateError, match="not a GAPA state"):
        gapa.GAPA.load(tmp_path / "other.safetensors", model)


def _rewrite(path: Path, edit, sign: bool = True) -> None:
    """``edit(metadata, tensors)`` in place on a saved file; ``sign`` recomputes the checksum,
    so only the load's validation can catch the edit (a writer's bug rather than a corruption)."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    tensors = load_file(str(path))
    edit(meta, tensors)
    if sign:
        meta.pop("checksum")
        meta["checksum"] = persistence._checksum(tensors, meta)
    tensors = {name: t.contiguous().clone() for name, t in tensors.items()}
    save_file(tensors, str(path), {META_KEY: json.dumps(meta)})


def _rewrite_metadata(path: Path, edit, sign: bool = False) -> None:
    """Edit the JSON metadata in place; ``sign`` recomputes the checksum."""
    _rewrite(path, lambda meta, tensors: edit(meta), sign)


def test_unknown_format_version(tmp_path):
    gm, model, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    _rewrite_metadata(path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(gapa.errors.FormatVersionError, match=f"format {FORMAT_VERSION + 1}"):
        gapa.GAPA.load(path, model)
    _rewrite_metadata(path, lambda m: m.update(format_version="two"))
    with pytest.raises(gapa.errors.FormatVersionError):
        gapa.GAPA.load(path, model)


def test_malformed_metadata(tmp_path):
    gm, model, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    _rewrite_metadata(path, lambda m: m.update(lengthscale_factor=3.0))
    with pytest.raises(gapa.errors.CorruptStateError, match="checksum"):  # metadata is covered too
        gapa.GAPA.load(path, model)
    _rewrite_metadata(path, lambda m: m.pop("sites"), sign=True)
    with pytest.raises(gapa.errors.CorruptStateError, match="malformed"):
        gapa.GAPA.load(path, model)
    _rewrite_metadata(path, lambda m: m.update(format_version=1))
    with pytest.raises(gapa.errors.CorruptStateError, match="altered"):
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
        with pytest.raises(gapa.errors.ArchitectureMismatchError, match="Sequential"):
            gapa.GAPA.load(path, other)


def test_other_weights(tmp_path):
    gm, model, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    with pytest.raises(gapa.errors.WeightsMismatchError, match="other weights"):
        gapa.GAPA.load(path, mlp([3, 16, 16, 1], seed=7))
    with torch.no_grad():
        model[0].bias[0] += 1e-6  # one weight, barely moved
    with pytest.raises(gapa.errors.WeightsMismatchError):
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


# --- the model fingerprint is the fit's -----------------------------------------------------------


def test_weights_changed_after_the_fit_are_not_saved(tmp_path):
    gm, model, x = _fitted()
    path = tmp_path / "s.gapa"
    old = model[0].weight[0, 0].item()
    with torch.no_grad():
        model[0].weight[0, 0] += 1
    with pytest.raises(gapa.ModelChangedError, match=r"s\.gapa.*changed since.*refit"):
        gm.save(path)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary left
    with torch.no_grad():
        model[0].weight[0, 0] = old
    gm.save(path)
    _same_outputs(gm, gapa.GAPA.load(path, model), x)


def test_refused_save_leaves_the_existing_file(tmp_path):
    gm, model, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    before = path.read_bytes()
    with torch.no_grad():
        model[2].bias[0] += 1
    with pytest.raises(gapa.ModelChangedError):
        gm.save(path)
    assert path.read_bytes() == before


def test_loaded_state_keeps_the_files_fingerprint(tmp_path):
    gm, model, _ = _fitted()
    path = gm.save(tmp_path / "s.gapa")
    with safe_open(str(path), "pt") as f:
        saved = json.loads(f.metadata()[META_KEY])["model"]
    assert saved == persistence.model_fingerprint(model)
    loaded = gapa.GAPA.load(path, model)
    assert loaded.state_dict()["model"] == saved
    with torch.no_grad():
        model[0].bias[0] += 1
    with pytest.raises(gapa.ModelChangedError):
        loaded.save(tmp_path / "again.gapa")


# --- impossible contents behind a consistent checksum --------------------------------------------


@pytest.fixture(scope="module")
def saved_states(tmp_path_factory):
    """One saved file per kind of state, written once: ``{kind: (bytes, model)}``."""
    folder = tmp_path_factory.mktemp("states")
    states = {}
    for kind, options in {"kmeans": {}, "hnsw": {"search": "hnsw"},
                          "ivf": {"m": None, "search": "ivf"}}.items():
        gm, model, _ = _fitted(**options)
        states[kind] = (gm.save(folder / f"{kind}.gapa").read_bytes(), model)
    model = mlp([3, 16, 4], seed=2)
    x, _ = _data()
    gm = gapa.GAPA(model, m=32).fit(x[:400], progress=False)
    gm.calibrate_classifier(x[400:500], model(x[400:500]).argmax(1))
    states["classifier"] = (gm.save(folder / "classifier.gapa").read_bytes(), model)
    return states


def _tensor(name, change):
    def edit(meta, tensors):
        tensors[name] = change(tensors[name].clone())
    return edit


def _put(value, *where):
    """Set ``metadata[where[0]][where[1]]... = value``."""
    def edit(meta, tensors):
        node = meta
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = value
    return edit


def _set(index, value):
    def change(t):
        t = t.double() if value != value or abs(value) == float("inf") else t
        t.view(-1)[index] = value
        return t
    return change


def _rename_site(new):
    def edit(meta, tensors):
        meta["sites"][new] = meta["sites"].pop("1")
        for name in [n for n in tensors if n.startswith("1/")]:
            tensors[new + name[1:]] = tensors.pop(name)
    return edit


def _other_faiss_index(rows, dim=None):
    """Replace site 1's saved faiss index by one of ``rows`` vectors of ``dim`` (default: the
    saved index's own dimension)."""
    faiss = pytest.importorskip("faiss")

    def edit(meta, tensors):
        index = faiss.IndexHNSWFlat(dim or meta["sites"]["1"]["index"]["dim"], 8)
        index.add(torch.randn(rows, index.d).numpy())
        tensors["1/index/index_bytes"] = torch.from_numpy(faiss.serialize_index(index).copy())
    return edit


NAN, INF = float("nan"), float("inf")
SITE = r"site '1': "
IDS = "the search index's ids .* are not a permutation of its 64 rows"
CORRUPT_CASES = {
    # counts: one finite positive weight per row
    "counts shorter": ("kmeans", _tensor("1/counts", lambda t: t[:-1]), SITE + "counts have shape"),
    "counts longer": ("kmeans", _tensor("1/counts", lambda t: torch.cat([t, t[:1]])),
                      SITE + "counts have shape"),
    "counts 2-D": ("kmeans", _tensor("1/counts", lambda t: t[None]), SITE + "counts have shape"),
    "counts zero": ("kmeans", _tensor("1/counts", _set(0, 0)), SITE + "counts must be finite"),
    "counts negative": ("kmeans", _tensor("1/counts", lambda t: -t), SITE + "counts must be"),
    "counts NaN": ("kmeans", _tensor("1/counts", _set(3, NAN)), SITE + "counts must be finite"),
    "counts Inf": ("ivf", _tensor("1/counts", _set(3, INF)), SITE + "counts must be finite"),
    # rows: N x width, finite
    "rows narrower": ("kmeans", _tensor("1/rows", lambda t: t[:, :-1]), SITE + "rows have shape"),
    "rows 1-D": ("kmeans", _tensor("1/rows", lambda t: t[0]), SITE + "rows have shape"),
    "rows empty": ("kmeans", _tensor("1/rows", lambda t: t[:0]), SITE + "rows have shape"),
    "rows integer": ("kmeans", _tensor("1/rows", lambda t: t.long()), SITE + "rows have shape"),
    "rows NaN": ("kmeans", _tensor("1/rows", _set(5, NAN)), SITE + "rows contain NaN/Inf"),
    "rows Inf": ("ivf", _tensor("3/rows", _set(0, -INF)), r"site '3': rows contain NaN/Inf"),
    "metadata width": ("kmeans", _put(15, "sites", "1", "width"), SITE + "rows have shape"),
    "width zero": ("kmeans", _put(0, "sites", "1", "width"), SITE + "width 0"),
    "width text": ("kmeans", _put("16", "sites", "1", "width"), SITE + "width '16'"),
    "rows missing": ("kmeans", lambda m, t: t.pop("1/rows"), SITE + "the tensor 1/rows is missing"),
    # hyperparameters: (width,) positive and finite; noise positive and finite
    "lengthscale short": ("kmeans", _tensor("1/lengthscale", lambda t: t[:-1]),
                          SITE + "lengthscale has shape"),
    "lengthscale 2-D": ("kmeans", _tensor("1/lengthscale", lambda t: t[None]),
                        SITE + "lengthscale has shape"),
    "lengthscale dtype": ("kmeans", _tensor("1/lengthscale", lambda t: t.double()),
                          SITE + "lengthscale has shape"),
    "lengthscale zero": ("kmeans", _tensor("1/lengthscale", _set(2, 0)),
                         SITE + "lengthscale must be finite and positive"),
    "lengthscale negative": ("kmeans", _tensor("1/lengthscale", lambda t: -t),
                             SITE + "lengthscale must be"),
    "lengthscale NaN": ("kmeans", _tensor("1/lengthscale", _set(2, NAN)), SITE + "lengthscale"),
    "amplitude long": ("kmeans", _tensor("1/amplitude", lambda t: torch.cat([t, t])),
                       SITE + "amplitude has shape"),
    "amplitude zero": ("kmeans", _tensor("1/amplitude", _set(0, 0)),
                       SITE + "amplitude must be finite and positive"),
    "amplitude Inf": ("kmeans", _tensor("1/amplitude", _set(0, INF)), SITE + "amplitude"),
    "noise zero": ("kmeans", _put(0.0, "sites", "1", "noise"), SITE + "noise is 0.0"),
    "noise negative": ("kmeans", _put(-0.01, "sites", "1", "noise"), SITE + "noise is -0.01"),
    "noise NaN": ("kmeans", _put(NAN, "sites", "1", "noise"), SITE + "noise is nan"),
    "noise Inf": ("kmeans", _put(INF, "sites", "1", "noise"), SITE + "noise is inf"),
    "noise text": ("kmeans", _put("0.01", "sites", "1", "noise"), SITE + "noise is '0.01'"),
    # cache_size: a positive integer, at least the rows
    "cache_size zero": ("kmeans", _put(0, "sites", "1", "cache_size"), SITE + "cache_size 0"),
    "cache_size negative": ("kmeans", _put(-400, "sites", "1", "cache_size"), SITE + "cache_size"),
    "cache_size fraction": ("kmeans", _put(400.5, "sites", "1", "cache_size"),
                            SITE + "cache_size 400.5"),
    "cache_size bool": ("kmeans", _put(True, "sites", "1", "cache_size"), SITE + "cache_size"),
    "cache_size below rows": ("kmeans", _put(10, "sites", "1", "cache_size"),
                              SITE + r"cache_size 10 is not an integer >= its 64 rows"),
    # the saved faiss index
    "ids out of range": ("hnsw", _tensor("1/index/ids", _set(0, 10**6)), SITE + IDS),
    "ids negative": ("hnsw", _tensor("1/index/ids", _set(0, -1)), SITE + IDS),
    "ids repeated": ("hnsw", _tensor("1/index/ids", lambda t: t.fill_(0)), SITE + IDS),
    "ids shorter": ("hnsw", _tensor("1/index/ids", lambda t: t[:-1]),
                    SITE + r"the search index's ids \(shape \(63,\)\)"),
    "index bytes truncated": ("hnsw", _tensor("1/index/index_bytes", lambda t: t[: len(t) // 2]),
                              SITE + "malformed .*RuntimeError"),
    "index bytes garbage": ("ivf", _tensor("1/index/index_bytes", lambda t: t.fill_(7)),
                            SITE + "malformed .*RuntimeError"),
    "index of fewer rows": ("hnsw", _other_faiss_index(10), SITE + r".*holds 10 x \d+ vectors"),
    "index of other width": ("hnsw", _other_faiss_index(64, 3), SITE + ".*holds 64 x 3 vectors"),
    "index rows metadata": ("ivf", _put(7, "sites", "1", "index", "rows"),
                            SITE + "malformed .*InputError"),
    "index params": ("hnsw", _put({"efSearch": "many"}, "sites", "1", "index", "params"),
                     SITE + "malformed .*ValueError"),
    "index backend": ("hnsw", _put("annoy", "sites", "1", "index", "backend"),
                      SITE + "malformed .*ConfigurationError"),
    # site keys and options
    "site of no module": ("kmeans", _rename_site("7"), r"site '7': its layer '7' is not one of"),
    "site of a Linear": ("kmeans", _rename_site("0"), r"site '0': its layer '0' is not one of"),
    "site call key": ("kmeans", _rename_site("x#1"), r"site 'x#1': its layer 'x'"),
    "no sites": ("kmeans", _put({}, "sites"), "the metadata: it holds no call sites"),
    "options layer": ("kmeans", _put(["1", "3", "9"], "options", "layers"),
                      "the metadata: malformed .*LayerError.*'9'"),
    "options k": ("kmeans", _put(100, "options", "k"),
                  SITE + "malformed .*ConfigurationError.*k=100"),
    "model fingerprint": ("kmeans", _put("abc", "model"), "no model fingerprint"),
    # calibrations, the lengthscale factor, the input shape, the count of fit inputs
    "calibration scale": ("kmeans", _put(-1.0, "calibration", "scale"),
                          "the calibration: calibration scale is -1.0"),
    "calibration noise": ("kmeans", _put(NAN, "calibration", "noise"),
                          "the calibration: calibration noise is nan"),
    "calibration nll": ("kmeans", _put(INF, "calibration", "nll"), "calibration nll is inf"),
    "calibration field": ("kmeans", lambda m, t: m["calibration"].pop("nll"),
                          "the calibration: malformed .*TypeError"),
    "class scale": ("classifier", _put(-0.5, "class_calibration", "scale"),
                    "class_calibration scale is -0.5"),
    "class nll": ("classifier", _put(-1.0, "class_calibration", "nll"),
                  "class_calibration nll is -1.0"),
    "class nll NaN": ("classifier", _put(NAN, "class_calibration", "nll"), "class_calibration nll"),
    "class map_nll": ("classifier", _put(INF, "class_calibration", "map_nll"),
                      "class_calibration map_nll is inf"),
    "class method": ("classifier", _put("vote", "class_calibration", "method"),
                     "the calibration: malformed .*ValueError"),
    "factor zero": ("kmeans", _put(0.0, "lengthscale_factor"), "lengthscale_factor is 0.0"),
    "factor negative": ("kmeans", _put(-2.0, "lengthscale_factor"), "lengthscale_factor is -2.0"),
    "factor NaN": ("kmeans", _put(NAN, "lengthscale_factor"), "lengthscale_factor is nan"),
    "factor Inf": ("kmeans", _put(INF, "lengthscale_factor"), "lengthscale_factor is inf"),
    "input_shape zero": ("kmeans", _put([0], "input_shape"), r"input_shape \[0\]"),
    "input_shape negative": ("kmeans", _put([-3], "input_shape"), r"input_shape \[-3\]"),
    "input_shape fraction": ("kmeans", _put([1.5], "input_shape"), r"input_shape \[1\.5\]"),
    "input_shape text": ("kmeans", _put("3", "input_shape"), "input_shape '3'"),
    "input_shape number": ("kmeans", _put(3, "input_shape"), "input_shape 3 is not a list"),
    "fit_inputs negative": ("kmeans", _put(-1, "fit_inputs"), "fit_inputs -1"),
    "fit_inputs fraction": ("kmeans", _put(2.5, "fit_inputs"), "fit_inputs 2.5"),
}


@pytest.mark.parametrize("case", list(CORRUPT_CASES))
def test_impossible_contents_are_corrupt_state(tmp_path, saved_states, case):
    kind, edit, match = CORRUPT_CASES[case]
    data, model = saved_states[kind]
    path = tmp_path / "s.gapa"
    path.write_bytes(data)
    _rewrite(path, edit)
    with pytest.raises(gapa.errors.CorruptStateError, match=match) as err:
        gapa.GAPA.load(path, model)
    assert str(err.value).startswith(f"{path}: ")


def test_raw_errors_are_chained(tmp_path, saved_states):
    data, model = saved_states["hnsw"]
    path = tmp_path / "s.gapa"
    path.write_bytes(data)
    _rewrite(path, _tensor("1/index/index_bytes", lambda t: t[:40]))
    with pytest.raises(gapa.errors.CorruptStateError) as err:
        gapa.GAPA.load(path, model)
    assert isinstance(err.value.__cause__, RuntimeError)  # faiss's own error


def test_unedited_states_load(tmp_path, saved_states):
    """The validation refuses nothing a fit writes."""
    for kind, (data, model) in saved_states.items():
        path = tmp_path / f"{kind}.gapa"
        path.write_bytes(data)
        _rewrite(path, lambda meta, tensors: None)
        assert gapa.GAPA.load(path, model).is_fitted
