"""The published regression backbone (MLP, 3 x 200 tanh), trained once and cached on disk.

Baselines that train their own networks (MC dropout, deep ensembles) train them here too, with
the same settings, so they share the cache; each cached file records how long its training took,
so a benchmark that loads it still reports the training cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from gapa.io import atomic_path, raw_bytes

from .data import RegressionData


def cache_dir() -> Path:
    """Where trained backbones live: ``$GAPA_CACHE_DIR`` or ``~/.cache/gapa``."""
    return Path(os.environ.get("GAPA_CACHE_DIR", Path.home() / ".cache" / "gapa"))


def mlp(
    d_in: int, d_out: int = 1, width: int = 200, depth: int = 3, dropout: float = 0.0
) -> nn.Sequential:
    """``depth`` hidden Linear + Tanh layers of ``width`` units, then a Linear head.

    With ``dropout > 0`` an ``nn.Dropout(dropout)`` follows each hidden Tanh (the MC-dropout
    architecture). Without, the modules are exactly Linear, Tanh, ..., Linear, so their names
    ("0", "1", ...) are those of the published backbone.
    """
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.Tanh()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def train_regressor(
    data: RegressionData,
    *,
    seed: int = 0,
    width: int = 200,
    depth: int = 3,
    max_epochs: int = 40,
    patience: int = 5,
    batch_size: int = 512,
    lr: float = 1e-3,
    dropout: float = 0.0,
    progress: bool = True,
) -> nn.Sequential:
    """Adam on the standardised MSE with early stopping on validation MSE; returns the best
    model, in eval mode.

    ``dropout`` builds :func:`mlp` with dropout layers, active while training and off (eval
    mode) for the validation MSE that early stopping watches.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear's initialisation (and dropout) draw from the global one
    model = mlp(data.n_features, width=width, depth=depth, dropout=dropout)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, stale = float("inf"), None, 0
    bar = tqdm(range(max_epochs), desc="training backbone", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(data.x_train), generator=gen)
        for idx in perm.split(batch_size):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = nn.functional.mse_loss(model(data.x_val), data.y_val).item()
        bar.set_postfix(val_mse=f"{val:.4f}")
        if val < best - 1e-5:
            best, stale = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    model.load_state_dict(best_state)
    return model.eval()


def fingerprint(tensors, **config) -> str:
    """16 hex digits of a SHA-256 over ``config`` (as sorted JSON) and the tensors' bytes."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for t in tensors:
        h.update(raw_bytes(t))
    return h.hexdigest()[:16]


def cached_model(
    path: Path, build: Callable[[], nn.Module], train: Callable[[], nn.Module], config: dict
) -> tuple[nn.Module, Path, bool]:
    """Load ``build()``'s weights from ``path``, or ``train()`` and save them there.

    Returns ``(model, path, trained)``. The file is written aside and renamed, so an interrupted
    run leaves none, and records the training's wall-clock seconds, the device it ran on and
    ``config``; a file without a training time (an older gapa's) is retrained. The model comes
    back on the CPU.
    """
    if path.exists() and training_seconds(path) is not None:
        model = build()
        model.load_state_dict(load_file(path))
        return model.eval(), path, False
    t0 = time.perf_counter()
    model = train()
    seconds = time.perf_counter() - t0
    metadata = {"train_s": repr(seconds), "config": json.dumps(config),
                "device": _device_name(next(model.parameters()).device)}
    model = model.cpu()
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  tmp, metadata)
    return model.eval(), path, True


def cached_regressor(data: RegressionData, *, seed: int = 0, progress: bool = True, **kw):
    """Train the backbone, or load it when the same data and settings were trained before.

    Returns ``(model, path, trained)`` (see :func:`cached_model`). The cache key hashes the
    training and validation data and the settings (``kw`` are :func:`train_regressor`'s;
    ``dropout=0`` counts as not given, so the published backbone keeps its key).
    """
    if not kw.get("dropout"):
        kw.pop("dropout", None)
    config = {"seed": seed, "arch": "mlp-tanh", **kw}
    key = fingerprint((data.x_train, data.y_train, data.x_val, data.y_val), **config)
    path = cache_dir() / "backbones" / f"{data.name}-{key}.safetensors"

    def build() -> nn.Module:
        return mlp(data.n_features, width=kw.get("width", 200), depth=kw.get("depth", 3),
                   dropout=kw.get("dropout", 0.0))

    return cached_model(path, build, lambda: train_regressor(data, seed=seed, progress=progress,
                                                             **kw), config)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def training_seconds(path: str | os.PathLike) -> float | None:
    """Wall-clock seconds the training of the cached backbone at ``path`` took; ``None`` for a
    file written before training times were recorded (:func:`cached_regressor` retrains those).
    """
    with safe_open(str(path), "pt") as f:
        recorded = (f.metadata() or {}).get("train_s")
    return None if recorded is None else float(recorded)
