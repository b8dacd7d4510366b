"""The image classifiers of the classification benchmark, trained once and cached on disk.

Two backbones: the published benchmark's MLP (2 hidden layers of 200 tanh units) and
:class:`gapa_bench.architectures.SmallResNet`. Baselines that train their own networks (MC dropout,
deep ensembles) train them here with the same settings and share the cache. A cached file
records its training time and the device that trained it (:func:`gapa_bench.backbones.cached_model`);
the key hashes the data and the settings, never the device, so weights trained on a GPU serve a
CPU run of the same benchmark.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from gapa.errors import ConfigurationError

from .architectures import SmallResNet
from .backbones import cache_dir, cached_model, fingerprint
from .data.images import ImageData

#: Training settings per architecture (see :func:`train_classifier`). The MLP follows the
#: published benchmark (Adam, no augmentation); the ResNet uses the standard CIFAR recipe (SGD
#: with Nesterov momentum, weight decay, cosine schedule, random crops and flips).
TRAIN_DEFAULTS: dict[str, dict] = {
    "mlp": {"epochs": 20, "batch_size": 128, "lr": 1e-3, "optimizer": "adam",
            "weight_decay": 0.0, "augment": False},
    "resnet": {"epochs": 15, "batch_size": 128, "lr": 0.1, "optimizer": "sgd",
               "weight_decay": 5e-4, "augment": True},
}
ARCHITECTURES = tuple(TRAIN_DEFAULTS)

_EVAL_BATCH = 2048
_CROP_PAD = 2  # pixels of zero padding for the random crops


def build_classifier(arch: str, n_classes: int = 10, *, in_shape=(1, 28, 28),
                     dropout: float = 0.0) -> nn.Module:
    """``"mlp"``: Flatten, then Linear/Tanh twice (200 units), then Linear, with an
    ``nn.Dropout(dropout)`` after each Tanh when ``dropout > 0``. ``"resnet"``: SmallResNet."""
    if arch == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        d_in = math.prod(in_shape)
        for i in range(2):
            layers += [nn.Linear(d_in if i == 0 else 200, 200), nn.Tanh()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(200, n_classes))
        return nn.Sequential(*layers)
    if arch == "resnet":
        return SmallResNet(n_classes, in_channels=in_shape[0], dropout=dropout)
    raise ConfigurationError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random crops of the zero-padded image, per image."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (_CROP_PAD,) * 4)
    span = 2 * _CROP_PAD + 1
    dy = torch.randint(span, (n,), generator=gen, device=x.device)
    dx = torch.randint(span, (n,), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    idx = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[idx, chan, rows, cols]


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` without autograd, in batches (bounded memory), on ``x``'s device; the model
    runs on its own device."""
    device = next(model.parameters()).device
    return torch.cat([model(xb.to(device)).to(x.device) for xb in x.split(_EVAL_BATCH)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``(x, y)``, in batches."""
    return int((logits(model, x).argmax(-1) == y.to(x.device)).sum()) / len(y)


def train_classifier(
    data: ImageData,
    arch: str = "mlp",
    *,
    seed: int = 0,
    dropout: float = 0.0,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    weight_decay: float,
    augment: bool,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> nn.Module:
    """Cross-entropy training with a cosine learning-rate schedule; returns the epoch with the
    best validation accuracy, in eval mode, on ``device``."""
    if optimizer not in ("adam", "sgd"):
        raise ConfigurationError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    torch.manual_seed(seed)  # the initialisation (and dropout) draw from the global generator
    model = build_classifier(arch, data.n_classes, in_shape=tuple(data.x_train.shape[1:]),
                             dropout=dropout).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                              weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best, best_state = -1.0, None
    bar = tqdm(range(epochs), desc=f"training {arch}", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        for idx in torch.randperm(len(x_train), generator=gen, device=device).split(batch_size):
            xb = _augment(x_train[idx], gen) if augment else x_train[idx]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), y_train[idx]).backward()
            opt.step()
            schedule.step()
        model.eval()
        val = accuracy(model, data.x_val, data.y_val)
        bar.set_postfix(val_acc=f"{val:.4f}")
        if val > best:
            best = val
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval()


def cached_classifier(
    data: ImageData,
    arch: str = "mlp",
    *,
    seed: int = 0,
    dropout: float = 0.0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **overrides,
) -> tuple[nn.Module, object, bool]:
    """Train ``arch`` on ``data`` (:data:`TRAIN_DEFAULTS` updated with ``overrides``), or load it
    when the same data and settings were trained before. Returns ``(model, path, trained)``
    with the model on the CPU in eval mode; ``device`` is where training runs."""
    if arch not in TRAIN_DEFAULTS:
        raise ConfigurationError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    unknown = set(overrides) - set(TRAIN_DEFAULTS[arch])
    if unknown:
        raise ConfigurationError(f"unknown training settings {sorted(unknown)}; known: "
                                 f"{', '.join(TRAIN_DEFAULTS[arch])}")
    settings = {**TRAIN_DEFAULTS[arch], **overrides}
    config = {"seed": seed, "arch": arch, **settings, **({"dropout": dropout} if dropout else {})}
    key = fingerprint((data.x_train, data.y_train, data.x_val, data.y_val), **config)
    path = cache_dir() / "classifiers" / f"{data.name}-{arch}-{key}.safetensors"
    shape = tuple(data.x_train.shape[1:])
    return cached_model(
        path,
        lambda: build_classifier(arch, data.n_classes, in_shape=shape, dropout=dropout),
        lambda: train_classifier(data, arch, seed=seed, dropout=dropout, device=device,
                                 progress=progress, **settings),
        config,
    )


#: Size of the deep ensembles in the benchmark.
ENSEMBLE_MEMBERS = 5


def networks_needed(methods, seeds: int) -> list[dict]:
    """The :func:`cached_classifier` keyword sets (``seed``, ``dropout``) that the benchmark's
    ``methods`` load over ``seeds``: each seed's backbone, the ensembles' other members and the
    MC-dropout copies (so they can be trained ahead, e.g. on a GPU)."""
    from .baselines.dropout import DROPOUT_RATES
    from .baselines.ensemble import member_seeds

    needed = [{"seed": s} for s in range(seeds)]
    if "ensemble" in methods:
        needed += [{"seed": m} for s in range(seeds) for m in member_seeds(s, ENSEMBLE_MEMBERS)[1:]]
    if "mc_dropout" in methods:
        needed += [{"seed": s, "dropout": p} for s in range(seeds) for p in DROPOUT_RATES]
    return needed
