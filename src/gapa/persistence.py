"""Fitted GAPA state on disk: tensors in safetensors, metadata as JSON in its header, no pickle.

One file holds everything a fitted :class:`gapa.GAPA` needs besides the model itself: every call
site's conditioning rows, their counts and hyperparameters, the search index, the calibrations
and the options. The header records a fingerprint of the model's architecture and of its
weights as they were at the fit, so a state is never saved for, nor applied to, a network whose
activations it does not describe. Every value is validated on load.

Format versions:

* 1 (gapa 0.1, first format): no checksum, no saved search index (it is rebuilt on load).
* 2 (current): a SHA-256 of every tensor, checked on load, and the search index's own state
  (the approximate faiss indexes are restored, not retrained).
* 3: the options under their current names (``noise_ratio``, ``noise_by_count``, ``queries``
  ``"per_position"``/``"per_input"``, override key ``noise_ratio``); files of formats 1 and 2
  name them as before and are read through :func:`_current_options`.
* 4: the option ``lengthscale_rule`` (files of formats 1 to 3 were all fitted with the
  ``"quantile"`` rule, its default).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import (
    ArchitectureMismatchError,
    ConfigurationError,
    CorruptStateError,
    FormatVersionError,
    GAPAError,
    InputError,
    MissingDependencyError,
    ModelChangedError,
    StateFileError,
    WeightsMismatchError,
)
from .gp.kernels import Hyperparameters
from .gp.site import GPSite
from .io import atomic_path, file_in_the_way, raw_bytes
from .predictive.classification import Method, VarianceScaleFit
from .predictive.regression import Calibration

if TYPE_CHECKING:
    from .core import GAPA

#: Written by :func:`save_state`; :func:`load_state` reads every version from 1 up to it.
FORMAT_VERSION = 4
FORMAT_NAME = "gapa-state"
#: Header key of the JSON metadata inside the safetensors file.
META_KEY = "gapa"


class FormatWarning(UserWarning):
    """A state file in an older format was loaded; saving it again upgrades it."""


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """Return SHA-256 digests of the model's architecture and of its weights.

    The architecture is module names and types, parameter and buffer names, shapes and dtypes;
    the weights are every parameter's and buffer's bytes.

    Parameters
    ----------
    model : nn.Module
        The network.

    Returns
    -------
    dict of str to str
        ``"class"`` (the model's class name), ``"architecture"`` and ``"weights"`` (hex
        digests).
    """
    arch = hashlib.sha256()
    weights = hashlib.sha256()
    for name, module in model.named_modules():
        arch.update(f"{name}:{type(module).__module__}.{type(module).__qualname__};".encode())
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        arch.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        weights.update(name.encode())
        weights.update(raw_bytes(t))
    return {"class": type(model).__qualname__, "architecture": arch.hexdigest(),
            "weights": weights.hexdigest()}


def same_model(fingerprint: dict, other: dict) -> bool:
    """Return whether two :func:`model_fingerprint` dicts describe the same network.

    Architecture and weights decide; the class name is only for messages.
    """
    return all(fingerprint.get(part) == other.get(part) for part in ("architecture", "weights"))


def save_state(gm: GAPA, path: str | os.PathLike) -> Path:
    """Write ``gm``'s fitted state to ``path`` atomically (aside, then renamed).

    An interrupted save leaves the previous file as it was. The file records the model's
    fingerprint of the fit.

    Parameters
    ----------
    gm : GAPA
        A fitted GAPA.
    path : str or os.PathLike
        The file to write.

    Returns
    -------
    Path
        ``path`` as a :class:`pathlib.Path`.

    Raises
    ------
    NotFittedError
        When ``gm`` is not fitted.
    ModelChangedError
        When the model's weights changed since the fit; nothing is written.
    StateFileError
        When ``path`` is a directory or cannot be written (permissions, a missing or read-only
        directory, a full disk); nothing is written.
    """
    state = gm.state_dict()
    path = Path(path)
    if path.is_dir():
        raise StateFileError(f"cannot save to {path}: it is a directory; give a file path "
                             f"such as {path / 'model.gapa'}")
    now = model_fingerprint(gm.model)
    fitted = state["model"] or now
    if not same_model(fitted, now):
        raise ModelChangedError(
            f"cannot save to {path}: the model's weights changed since this GAPA was fitted, so "
            "its cached activations (and variances) describe the old network; refit with "
            "gm.fit(...), or restore the weights it was fitted on, then save")
    tensors: dict[str, torch.Tensor] = {}
    sites = {}
    for key, site in state["sites"].items():
        hp = site.hyperparameters
        tensors[f"{key}/rows"] = site.rows
        tensors[f"{key}/counts"] = site.counts
        tensors[f"{key}/lengthscale"] = site.fitted_lengthscale
        tensors[f"{key}/amplitude"] = hp.amplitude
        meta = {"cache_size": site.cache_size, "width": site.width, "noise": hp.noise}
        if site.index is not None:
            index_state = dict(site.index.state())
            for name in [n for n, v in index_state.items() if isinstance(v, np.ndarray)]:
                tensors[f"{key}/index/{name}"] = torch.from_numpy(index_state.pop(name).copy())
            meta["index"] = index_state
        sites[key] = meta
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    class_cal, calibration, shape = (state["class_calibration"], state["calibration"],
                                     state["input_shape"])
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "gapa_version": _library_version(),
        "model": dict(fitted),
        "options": state["options"],
        "input_shape": list(shape) if shape is not None else None,
        "input_ids": state["input_ids"],
        "fit_inputs": state["fit_inputs"],
        "training_ok": state["training_ok"],
        "lengthscale_factor": state["lengthscale_factor"],
        "calibration": asdict(calibration) if calibration is not None else None,
        "class_calibration": None if class_cal is None else {
            **asdict(class_cal), "method": class_cal.method.value},
        "sites": sites,
    }
    metadata["checksum"] = _checksum(tensors, metadata)
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, {META_KEY: json.dumps(metadata)})
    except OSError as exc:  # the temporary file's name would say nothing to the caller
        if isinstance(exc, GAPAError):
            raise
        where = file_in_the_way(path.parents)
        reason = where or f"{exc.strerror or exc} (writing beside it in {path.parent})"
        raise StateFileError(f"cannot save to {path}: {reason}; nothing was written and any "
                             "file already there is unchanged") from exc
    return path


def load_state(cls: type[GAPA], path: str | os.PathLike, model: nn.Module,
               map_location: str | torch.device | None = None) -> GAPA:
    """Load a fitted :class:`gapa.GAPA` around ``model`` from :func:`save_state`'s file.

    Every value of the file is validated before it is used.

    Parameters
    ----------
    cls : type of GAPA
        The class to build.
    path : str or os.PathLike
        The file.
    model : nn.Module
        The network the state was fitted on.
    map_location : str or torch.device or None, default None
        The device for the state's tensors; ``None`` takes the device of the model's
        parameters.

    Returns
    -------
    GAPA
        The fitted GAPA.

    Raises
    ------
    StateFileError
        When there is no readable file at ``path``.
    CorruptStateError
        A truncated file, not a GAPA file, a failed checksum, or impossible contents.
    FormatVersionError
        A newer or unknown format.
    ArchitectureMismatchError
        When the state was fitted on a model with other modules or parameter shapes.
    WeightsMismatchError
        When the state was fitted on the same architecture with other weights.
    MissingDependencyError
        When the saved search index needs faiss and faiss is not installed.
    ConfigurationError
        A ``map_location`` that is not a device this torch can use.
    InputError
        When ``model`` is not a ``torch.nn.Module``.

    Warns
    -----
    FormatWarning
        When the file is in an older format (it loads; saving it again upgrades it).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    metadata, tensors = _read(path)
    version = metadata.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path} is GAPA state format {version!r}; this gapa ({_library_version()}) reads "
            f"formats 1 to {FORMAT_VERSION}: upgrade gapa to load it"
        )
    if version == 1 and "checksum" in metadata:  # formats from 2 on have one: altered
        raise CorruptStateError(f"{path} claims format {version} but carries a checksum; "
                                "its metadata was altered")
    if version < FORMAT_VERSION:
        warnings.warn(f"{path} is GAPA state format {version} (current {FORMAT_VERSION}); it "
                      "loads, and saving it again writes the current format", FormatWarning,
                      stacklevel=3)
    if version > 1:
        expected = metadata.pop("checksum", None)
        if expected != _checksum(tensors, metadata):
            raise CorruptStateError(f"{path}: the contents do not match their recorded checksum; "
                                    "the file is corrupted: refit or restore a good copy")
    _check_model(path, metadata.get("model"), model)
    device = map_location if map_location is not None else model_device(model)
    try:  # an unusable map_location fails here, not as a corrupt file
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot load {path} with map_location={map_location!r}: not a device this torch "
            f"can use ({type(exc).__name__}: {exc}); pass a device such as 'cpu', or None for "
            "the model's") from exc
    return _build(cls, path, model, metadata, tensors, device)


class _Invalid(Exception):
    """A value of a state file that is impossible (reported as a CorruptStateError)."""


@contextlib.contextmanager
def _rebuilding(path: Path, where: str):
    """Turn any failure while rebuilding ``where`` from the file into a CorruptStateError.

    The error names the file, the place and the problem; a missing optional back end stays what
    it is.
    """
    try:
        yield
    except (StateFileError, MissingDependencyError):
        raise
    except Exception as exc:
        problem = str(exc) if isinstance(exc, _Invalid) else (
            f"malformed ({type(exc).__name__}: {exc})")
        raise CorruptStateError(f"{path}: {where}: {problem}; the file is corrupted: refit, or "
                                "restore a good copy") from exc


def _build(cls: type[GAPA], path: Path, model: nn.Module, metadata: dict,
           tensors: dict[str, torch.Tensor], device) -> GAPA:
    """Build the GAPA the checked metadata and tensors describe; every value is validated first."""
    with _rebuilding(path, "the metadata"):
        gm = cls(model, **_current_options(metadata["options"]))
        factor = _number(metadata["lengthscale_factor"], "lengthscale_factor", 0, strict=True)
        shape = metadata["input_shape"]
        if shape is not None and not (isinstance(shape, list) and all(
                _is_int(s) and s > 0 for s in shape)):
            raise _Invalid(f"input_shape {shape!r} is not a list of positive integers")
        ids = metadata.get("input_ids")  # not in files written before it: not checked
        if not (ids is None or isinstance(ids, bool)):
            raise _Invalid(f"input_ids {ids!r} is not true, false or null")
        fit_inputs = metadata.get("fit_inputs", 0)  # not in format 1
        if not _is_int(fit_inputs) or fit_inputs < 0:
            raise _Invalid(f"fit_inputs {fit_inputs!r} is not a non-negative integer")
        training_ok = metadata.get("training_ok", [])  # not before gapa 0.1 format 2's end
        if not isinstance(training_ok, list) or not all(isinstance(n, str) for n in training_ok):
            raise _Invalid(f"training_ok {training_ok!r} is not a list of module names")
        sites_meta = metadata["sites"]
        if not isinstance(sites_meta, dict) or not sites_meta:
            raise _Invalid("it holds no call sites")
    with _rebuilding(path, "the calibration"):
        calibration = _calibration(metadata["calibration"])
        class_cal = _class_calibration(metadata["class_calibration"])
    sites = {}
    for key, meta in sites_meta.items():
        with _rebuilding(path, f"site {key!r}"):
            sites[key] = _site(gm, key, meta, tensors, factor, device)
    return gm.load_state_dict({
        "sites": sites, "model": metadata["model"], "input_shape": shape, "input_ids": ids,
        "fit_inputs": fit_inputs, "training_ok": training_ok, "lengthscale_factor": factor,
        "calibration": calibration, "class_calibration": class_cal})


#: Option names and values of formats 1 and 2 -> their current ones.
_RENAMED = {"noise": "noise_ratio", "count_noise": "noise_by_count"}
_QUERIES = {"positions": "per_position", "inputs": "per_input"}


def _current_options(options: dict) -> dict:
    """Return the saved constructor options under today's names.

    Formats 1 and 2 used older ones.
    """
    if not isinstance(options, dict):
        raise _Invalid(f"the options are a {type(options).__name__}, not a mapping")
    current = {_RENAMED.get(k, k): v for k, v in options.items()}
    if current.get("queries") in _QUERIES:
        current["queries"] = _QUERIES[current["queries"]]
    overrides = current.get("hyperparameters")
    if isinstance(overrides, dict):
        current["hyperparameters"] = {
            layer: {_RENAMED.get(k, k): v for k, v in values.items()}
            if isinstance(values, dict) else values for layer, values in overrides.items()}
    return current


def _site(gm: GAPA, key: str, meta: dict, tensors: dict[str, torch.Tensor], factor: float,
          device) -> GPSite:
    """Rebuild one call site from its metadata and tensors, each checked against the others."""
    layer = key.split("#")[0]
    if layer not in gm.layers:
        raise _Invalid(f"its layer {layer!r} is not one of the saved GAPA layers {gm.layers} of "
                       "this model")
    width = meta["width"]
    if not _is_int(width) or width < 1:
        raise _Invalid(f"width {width!r} is not a positive integer")

    def tensor(name: str) -> torch.Tensor:
        if f"{key}/{name}" not in tensors:
            raise _Invalid(f"the tensor {key}/{name} is missing")
        return tensors[f"{key}/{name}"]

    rows = tensor("rows")
    if not rows.is_floating_point() or rows.dim() != 2 or rows.shape[0] < 1 or (
            rows.shape[1] != width):
        raise _Invalid(f"rows have shape {tuple(rows.shape)} ({rows.dtype}); expected "
                       f"(N >= 1, {width}) floating point, the width in the metadata")
    if not bool(torch.isfinite(rows).all()):
        raise _Invalid("rows contain NaN/Inf values")
    n = len(rows)
    counts = tensor("counts")
    if counts.shape != (n,) or counts.dtype == torch.bool or counts.is_complex():
        raise _Invalid(f"counts have shape {tuple(counts.shape)} ({counts.dtype}); expected "
                       f"({n},) real numbers, one per row")
    if not bool((torch.isfinite(counts) & (counts > 0)).all()):
        raise _Invalid("counts must be finite and positive")
    hp = {}
    for name in ("lengthscale", "amplitude"):
        t = tensor(name)
        if t.shape != (width,) or t.dtype != rows.dtype:
            raise _Invalid(f"{name} has shape {tuple(t.shape)} ({t.dtype}); expected ({width},) "
                           f"in the rows' {rows.dtype}")
        if not bool((torch.isfinite(t) & (t > 0)).all()):
            raise _Invalid(f"{name} must be finite and positive")
        hp[name] = t.to(device)
    noise = _number(meta["noise"], "noise", 0, strict=True)
    cache_size = meta["cache_size"]
    if not _is_int(cache_size) or cache_size < n:
        raise _Invalid(f"cache_size {cache_size!r} is not an integer >= its {n} rows")
    index_state = meta.get("index")
    if index_state is not None:
        prefix = f"{key}/index/"
        arrays = {name[len(prefix):]: t.numpy() for name, t in tensors.items()
                  if name.startswith(prefix)}
        ids = arrays.get("ids")
        if ids is not None and (
                ids.shape != (n,) or not np.array_equal(np.sort(ids), np.arange(n))):
            raise _Invalid(f"the search index's ids (shape {ids.shape}) are not a permutation of "
                           f"its {n} rows (out of range, repeated or of the wrong length)")
        index_state = {**index_state, **arrays}
    site = GPSite.restore(key, gm.config, rows.to(device), counts.to(device),
                          Hyperparameters(noise=noise, **hp), cache_size, factor, index_state)
    searched = site.index
    index = getattr(searched, "_index", None)  # the faiss index, for the faiss back ends
    if index is not None and (index.ntotal, index.d) != (len(searched), searched.dim):
        raise _Invalid(f"the saved search index holds {index.ntotal} x {index.d} vectors, "
                       f"not the {len(searched)} x {searched.dim} points it searches")
    return site


def _calibration(value) -> Calibration | None:
    if value is None:
        return None
    cal = Calibration(**value)
    for name in ("scale", "noise"):
        _number(getattr(cal, name), f"calibration {name}", 0)
    _number(cal.nll, "calibration nll")  # a density's NLL may be negative
    return cal


def _class_calibration(value) -> VarianceScaleFit | None:
    if value is None:
        return None
    fit = VarianceScaleFit(**{**value, "method": Method(value["method"])})
    for name in ("scale", "nll", "map_nll"):
        _number(getattr(fit, name), f"class_calibration {name}", 0)
    return fit


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value, name: str, minimum: float | None = None, *, strict: bool = False) -> float:
    """Return ``value`` as a float.

    Raises _Invalid unless it is a finite real number >= (``strict``: >) ``minimum``.
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum}"
        raise _Invalid(f"{name} is {value!r}; it must be a finite number{bound}")
    return float(value)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise StateFileError(f"no GAPA state file at {path}")
    if not os.access(path, os.R_OK):
        raise StateFileError(f"{path} is not readable by this user (permissions)")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for every malformation
        raise CorruptStateError(f"{path} is not a readable safetensors file (truncated or "
                                f"corrupted?): {exc}") from exc
    if META_KEY not in header:
        raise CorruptStateError(f"{path} is a safetensors file but not a GAPA state "
                                f"(no {META_KEY!r} metadata); was it written by gm.save?")
    try:
        metadata = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise CorruptStateError(f"{path}: the GAPA metadata is not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise CorruptStateError(f"{path}: the metadata does not describe a {FORMAT_NAME!r}")
    return metadata, tensors


def _check_model(path: Path, saved, model: nn.Module) -> None:
    if not isinstance(saved, dict):
        raise CorruptStateError(f"{path}: the metadata has no model fingerprint; the file is "
                                "corrupted: refit, or restore a good copy")
    actual = model_fingerprint(model)
    if saved.get("architecture") != actual["architecture"]:
        raise ArchitectureMismatchError(
            f"{path} was fitted on a {saved.get('class', '?')} whose modules or parameter shapes "
            f"differ from this {actual['class']}'s; load it onto the network it was fitted on")
    if saved.get("weights") != actual["weights"]:
        raise WeightsMismatchError(
            f"{path} was fitted on the same architecture with other weights; the cached "
            "activations do not describe this network: refit GAPA after changing the weights")


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict) -> str:
    """Return the SHA-256 of the metadata (canonical JSON, no checksum) and every tensor."""
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(raw_bytes(t))
    return h.hexdigest()


def model_device(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter.

    Parameters
    ----------
    model : nn.Module
        The network.

    Returns
    -------
    torch.device
        The device, or the CPU for a model without parameters.
    """
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _library_version() -> str:
    from . import __version__

    return __version__
