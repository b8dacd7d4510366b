"""The published regression backbone (MLP, 3 x 200 tanh), trained once and cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import RegressionData
from .io import atomic_path


def cache_dir() -> Path:
    """Where trained backbones live: ``$GAPA_CACHE_DIR`` or ``~/.cache/gapa``."""
    return Path(os.environ.get("GAPA_CACHE_DIR", Path.home() / ".cache" / "gapa"))


def mlp(d_in: int, d_out: int = 1, width: int = 200, depth: int = 3) -> nn.Sequential:
    """``depth`` hidden Linear + Tanh layers of ``width`` units, then a Linear head."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.Tanh()]
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
    progress: bool = True,
) -> nn.Sequential:
    """Adam on the standardised MSE with early stopping on validation MSE; returns the best
    model, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear's initialisation draws from the global generator
    model = mlp(data.n_features, width=width, depth=depth)
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


def _fingerprint(data: RegressionData, **config) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for t in (data.x_train, data.y_train, data.x_val, data.y_val):
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def cached_regressor(data: RegressionData, *, seed: int = 0, progress: bool = True, **kw):
    """Train the backbone, or load it when the same data and settings were trained before.

    Returns ``(model, path, trained)``. The cache key hashes the training and validation data
    and the settings; files are written aside and renamed, so an interrupted run leaves none.
    """
    config = {"seed": seed, "arch": "mlp-tanh", **kw}
    path = cache_dir() / "backbones" / f"{data.name}-{_fingerprint(data, **config)}.safetensors"
    width, depth = kw.get("width", 200), kw.get("depth", 3)
    if path.exists():
        model = mlp(data.n_features, width=width, depth=depth)
        model.load_state_dict(load_file(path))
        return model.eval(), path, False
    model = train_regressor(data, seed=seed, progress=progress, **kw)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    return model, path, True
