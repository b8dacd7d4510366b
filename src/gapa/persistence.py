"""Fitted GAPA state on disk: tensors in safetensors, metadata as JSON in its header, no pickle.

One file holds everything a fitted :class:`gapa.GAPA` needs besides the model itself: every call
site's conditioning rows, their counts and hyperparameters, the search index, the calibrations
and the options. The header records a fingerprint of the model's architecture and of its
weights, so a state is never applied to a network whose activations it does not describe.

Format versions:

* 1 (gapa 0.1, first format): no checksum, no saved search index (it is rebuilt on load).
* 2 (current): a SHA-256 of every tensor, checked on load, and the search index's own state
  (the approximate faiss indexes are restored, not retrained).
"""

from __future__ import annotations

import hashlib
import json
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

from .calibration import Calibration
from .classification import Method, VarianceScaleFit
from .errors import (
    ArchitectureMismatchError,
    CorruptStateError,
    FormatVersionError,
    StateFileError,
    WeightsMismatchError,
)
from .io import atomic_path, raw_bytes
from .kernels import Hyperparameters
from .site import GPSite

if TYPE_CHECKING:
    from .core import GAPA

#: Written by :func:`save_state`; :func:`load_state` reads every version from 1 up to it.
FORMAT_VERSION = 2
FORMAT_NAME = "gapa-state"
#: Header key of the JSON metadata inside the safetensors file.
META_KEY = "gapa"


class FormatWarning(UserWarning):
    """A state file in an older format was loaded; saving it again upgrades it."""


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """SHA-256 digests of the model's architecture (module names and types, parameter and buffer
    names, shapes, dtypes) and of its weights (every parameter's and buffer's bytes)."""
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


def save_state(gm: GAPA, path: str | os.PathLike) -> Path:
    """Write ``gm``'s fitted state to ``path`` atomically (aside, then renamed): an interrupted
    save leaves the previous file as it was."""
    gm._require_fitted("save")
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    sites = {}
    for key, site in gm.sites.items():
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
    class_cal = gm._class_calibration
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "gapa_version": _library_version(),
        "model": model_fingerprint(gm.model),
        "options": gm.options(),
        "input_shape": list(gm._input_shape) if gm._input_shape is not None else None,
        "fit_inputs": gm._fit_inputs,
        "lengthscale_factor": gm.lengthscale_factor,
        "calibration": asdict(gm.calibration) if gm.calibration is not None else None,
        "class_calibration": None if class_cal is None else {
            **asdict(class_cal), "method": class_cal.method.value},
        "sites": sites,
    }
    metadata["checksum"] = _checksum(tensors, metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, {META_KEY: json.dumps(metadata)})
    return path


def load_state(cls: type[GAPA], path: str | os.PathLike, model: nn.Module,
               map_location: str | torch.device | None = None) -> GAPA:
    """A fitted :class:`gapa.GAPA` around ``model`` from :func:`save_state`'s file.

    Raises :class:`gapa.CorruptStateError` (truncated, not a GAPA file, checksum),
    :class:`gapa.FormatVersionError` (a newer or unknown format),
    :class:`gapa.ArchitectureMismatchError` or :class:`gapa.WeightsMismatchError` (another
    model); an older format loads with a :class:`FormatWarning`. ``map_location`` moves the
    state's tensors (default: the device of the model's parameters).
    """
    path = Path(path)
    metadata, tensors = _read(path)
    version = metadata.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path} is GAPA state format {version!r}; this gapa ({_library_version()}) reads "
            f"formats 1 to {FORMAT_VERSION}: upgrade gapa to load it"
        )
    if version < FORMAT_VERSION:
        if "checksum" in metadata:  # only the current format has one: the version was altered
            raise CorruptStateError(f"{path} claims format {version} but carries a checksum; "
                                    "its metadata was altered")
        warnings.warn(f"{path} is GAPA state format {version} (current {FORMAT_VERSION}); it "
                      "loads, and saving it again writes the current format", FormatWarning,
                      stacklevel=3)
    else:
        expected = metadata.pop("checksum", None)
        if expected != _checksum(tensors, metadata):
            raise CorruptStateError(f"{path}: the contents do not match their recorded checksum; "
                                    "the file is corrupted: refit or restore a good copy")
    _check_model(path, metadata.get("model", {}), model)
    device = map_location if map_location is not None else model_device(model)
    try:
        gm = cls(model, **metadata["options"])
        factor = float(metadata["lengthscale_factor"])
        sites = {}
        for key, meta in metadata["sites"].items():
            def tensor(name: str, key=key) -> torch.Tensor:
                return tensors[f"{key}/{name}"].to(device)

            hp = Hyperparameters(lengthscale=tensor("lengthscale"), amplitude=tensor("amplitude"),
                                 noise=float(meta["noise"]))
            index_state = meta.get("index")
            if index_state is not None:
                prefix = f"{key}/index/"
                index_state = {**index_state, **{
                    n[len(prefix):]: tensors[n].numpy() for n in tensors if n.startswith(prefix)}}
            sites[key] = GPSite.restore(
                key, gm.config, tensor("rows"), tensor("counts"), hp, int(meta["cache_size"]),
                factor, index_state)
        shape = metadata["input_shape"]
        calibration = metadata["calibration"]
        class_cal = metadata["class_calibration"]
        gm._fit_inputs = int(metadata.get("fit_inputs", 0))  # not in format 1
        gm._restore(
            sites, tuple(shape) if shape is not None else None, factor,
            Calibration(**calibration) if calibration is not None else None,
            None if class_cal is None else VarianceScaleFit(
                **{**class_cal, "method": Method(class_cal["method"])}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptStateError(f"{path}: the GAPA metadata is incomplete or malformed "
                                f"({type(exc).__name__}: {exc})") from exc
    return gm


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


def _check_model(path: Path, saved: dict, model: nn.Module) -> None:
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
    """SHA-256 over the metadata (canonical JSON, without the checksum) and every tensor."""
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(raw_bytes(t))
    return h.hexdigest()


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _library_version() -> str:
    from . import __version__

    return __version__
