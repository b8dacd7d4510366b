"""The U-Nets of the segmentation benchmark, trained once per seed and cached on disk.

Sized for a CPU: widths 8/16/32 on 64 x 64 scenes train in minutes on two cores (the training
time is recorded in the cached file, :func:`gapa_bench.backbones.cached_model`). Adam with a
cosine schedule, random horizontal flips of scene and label map together, pixel cross-entropy
that skips :data:`gapa_bench.data.scenes.IGNORE`; the epoch with the best validation mIoU is
kept. The MC-dropout baseline's network is the same U-Net trained with channel dropout.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from gapa.errors import ConfigurationError

from .architectures import UNet
from .backbones import cache_dir, cached_model, fingerprint
from .data.scenes import IGNORE, SceneData

#: The U-Net's widths (encoder, second level, bottleneck).
WIDTHS = (8, 16, 32)
#: Training settings (see :func:`train_segmenter`).
TRAIN_SETTINGS: dict = {"epochs": 10, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4}
_EVAL_BATCH = 128


def build_segmenter(n_classes: int, dropout: float = 0.0) -> UNet:
    """The benchmark's U-Net for 1-channel scenes and ``n_classes`` labels."""
    return UNet(num_classes=n_classes, in_channels=1, widths=WIDTHS, dropout=dropout)


def segment_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, ``(N, C, H, W)``, without autograd and in batches."""
    with torch.no_grad():
        return torch.cat([model(xb) for xb in x.split(_EVAL_BATCH)])


def mean_iou(predicted: torch.Tensor, labels: torch.Tensor, n_classes: int) -> float:
    """Mean intersection over union over the classes present in ``labels`` or ``predicted``
    (pixels labelled IGNORE are left out)."""
    from torchmetrics.functional.classification import multiclass_jaccard_index

    keep = labels != IGNORE
    return float(multiclass_jaccard_index(predicted[keep], labels[keep], n_classes,
                                          average="macro"))


def train_segmenter(data: SceneData, *, seed: int = 0, dropout: float = 0.0, epochs: int,
                    batch_size: int, lr: float, weight_decay: float, progress: bool = True) -> UNet:
    """Train the U-Net on ``data.train``; return the epoch with the best validation mIoU."""
    torch.manual_seed(seed)  # initialisation and dropout draw from the global generator
    model = build_segmenter(data.n_classes, dropout)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.train.images, data.train.labels
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(x) / batch_size))
    best, best_state = -1.0, None
    bar = tqdm(range(epochs), desc="training U-Net", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            xb, yb = x[idx], y[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            yb = torch.where(flip[:, None, None], yb.flip(-1), yb)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb, ignore_index=IGNORE).backward()
            opt.step()
            schedule.step()
        model.eval()
        val = mean_iou(segment_logits(model, data.val.images).argmax(1), data.val.labels,
                       data.n_classes)
        bar.set_postfix(val_miou=f"{val:.4f}")
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval()


def cached_segmenter(data: SceneData, *, seed: int = 0, dropout: float = 0.0,
                     progress: bool = True, **overrides) -> tuple[nn.Module, object, bool]:
    """Train the U-Net (:data:`TRAIN_SETTINGS` updated with ``overrides``) or load it when the
    same scenes and settings were trained before. Returns ``(model, path, trained)``."""
    unknown = set(overrides) - set(TRAIN_SETTINGS)
    if unknown:
        raise ConfigurationError(f"unknown training settings {sorted(unknown)}; known: "
                                 f"{', '.join(TRAIN_SETTINGS)}")
    settings = {**TRAIN_SETTINGS, **overrides}
    config = {"seed": seed, "widths": list(WIDTHS), **settings,
              **({"dropout": dropout} if dropout else {})}
    scenes = (data.train.images, data.train.labels, data.val.images, data.val.labels)
    key = fingerprint(scenes, **config)
    path = cache_dir() / "segmenters" / f"scenes{data.side}-unet-{key}.safetensors"
    return cached_model(
        path, lambda: build_segmenter(data.n_classes, dropout),
        lambda: train_segmenter(data, seed=seed, dropout=dropout, progress=progress, **settings),
        config)
