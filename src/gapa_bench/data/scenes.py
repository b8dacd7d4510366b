"""Segmentation scenes composed from real images, with per-pixel labels (issue 18).

No labelled segmentation set is reachable offline, so each scene is composed: a ``side x side``
canvas with a smooth random texture as background, 2 to 4 Fashion-MNIST items, each resized by a
random factor and pasted at a random position (a later item occludes an earlier one), and pixel
noise over the whole. An item's mask is its resized image above :data:`ITEM_THRESHOLD`; the label
map holds 0 for background and ``1 + class`` on the item's mask, so there are 11 classes.

Splits never share an image: train and validation scenes take their items from the disjoint
train and validation parts of Fashion-MNIST's training file, test scenes from its test file.
Out-of-distribution scenes are test scenes in which some items are objects of an unknown kind:
real MNIST digits, or patches of the two photographs bundled with scikit-learn cut to an
ellipse. Their pixels are the positives of pixel-level OOD detection (``Scenes.unknown``) and
carry the label :data:`IGNORE`, so no in-distribution metric scores them. Shifted test sets add
Gaussian noise, blur or a loss of contrast of increasing strength (:func:`shifted`).

Everything is a function of the seed: the same seed gives the same scenes, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .images import FASHION_MNIST_CLASSES, load_fashion_mnist, load_mnist

__all__ = [
    "IGNORE",
    "ITEM_THRESHOLD",
    "SCENE_CLASSES",
    "SHIFTS",
    "Item",
    "SceneData",
    "Scenes",
    "compose",
    "load_scenes",
    "photo_patches",
    "render",
    "shifted",
]

ITEM_THRESHOLD = 0.2
"""An item's pixels above this intensity (in [0, 1]) are its mask."""

IGNORE = -100
"""The label of unknown objects' pixels (PyTorch's ``ignore_index``)."""

SCENE_CLASSES = ("background", *FASHION_MNIST_CLASSES)
"""Label ``k`` names ``SCENE_CLASSES[k]``."""

SHIFTS = ("noise", "blur", "contrast")
"""The kinds of :func:`shifted`."""

#: The background texture's range: a smooth field in ``[0, BACKGROUND_LEVEL]``.
BACKGROUND_LEVEL = 0.3
#: Pixels per node of the texture's coarse random grid (bilinear in between).
TEXTURE_CELL = 8
#: Standard deviation of the pixel noise over the whole scene.
PIXEL_NOISE = 0.02
#: Items per scene, lowest and highest.
ITEMS = (2, 4)
#: Resize factors of a 28 x 28 item, lowest and highest.
SCALES = (0.75, 1.5)


@dataclass(frozen=True)
class Item:
    """One pasted object: which image of which pool, its label, size and place."""

    kind: str  #: "known" (a Fashion-MNIST item) or the unknown kind ("mnist", "photo")
    index: int  #: row of the pool it was taken from
    label: int  #: 1 + its class, or IGNORE for an unknown object
    size: int  #: side of the resized square, in pixels
    top: int
    left: int


@dataclass(frozen=True, eq=False)
class Scenes:
    """Composed scenes; ``items[i]`` says how scene ``i`` was made."""

    images: torch.Tensor  #: (n, 1, side, side) float32 in [0, 1]
    labels: torch.Tensor  #: (n, side, side) int64: 0 background, 1 + class, IGNORE if unknown
    items: tuple[tuple[Item, ...], ...] = field(repr=False)

    @property
    def unknown(self) -> torch.Tensor:
        """(n, side, side) bool: the pixels of unknown objects (the OOD positives)."""
        return self.labels == IGNORE

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True, eq=False, repr=False)
class SceneData:
    """Train, validation and test scenes, and out-of-distribution test scenes per unknown kind."""

    train: Scenes
    val: Scenes
    test: Scenes
    ood: dict[str, Scenes]
    side: int
    seed: int
    classes: tuple[str, ...] = SCENE_CLASSES

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        ood = ", ".join(f"{k} {len(v)}" for k, v in self.ood.items())
        return (f"scenes {self.side}x{self.side}, {self.n_classes} classes, train/val/test = "
                f"{len(self.train)}/{len(self.val)}/{len(self.test)}, OOD: {ood}")


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(image[None, None], size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True)[0, 0].clamp(0.0, 1.0)


def _background(rng: np.random.Generator, side: int) -> torch.Tensor:
    cells = side // TEXTURE_CELL + 2
    grid = torch.from_numpy(rng.uniform(0.0, BACKGROUND_LEVEL, (1, 1, cells, cells)))
    return F.interpolate(grid.float(), size=(side, side), mode="bilinear",
                         align_corners=False)[0, 0]


def render(items: tuple[Item, ...], pools: dict[str, torch.Tensor], background: torch.Tensor,
           noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``items`` in order on ``background``; return the image and its label map.

    ``pools[item.kind]`` holds the item images (n, 28, 28) in [0, 1]; an unknown photo patch is
    already cut (its pixels outside the ellipse are 0). ``noise`` is added last; the image is
    clipped to [0, 1].
    """
    image = background.clone()
    labels = torch.zeros(background.shape, dtype=torch.int64)
    for it in items:
        patch = _resize(pools[it.kind][it.index], it.size)
        mask = patch > ITEM_THRESHOLD
        window = (slice(it.top, it.top + it.size), slice(it.left, it.left + it.size))
        image[window] = torch.where(mask, patch, image[window])
        labels[window] = torch.where(mask, it.label, labels[window])
    return (image + noise).clamp(0.0, 1.0), labels


def compose(pool: torch.Tensor, pool_labels: torch.Tensor, n: int, *, side: int, seed: int,
            unknown: dict[str, torch.Tensor] | None = None) -> Scenes:
    """Compose ``n`` scenes of ``side x side`` from the images ``pool`` (m, 28, 28).

    With ``unknown`` (kind -> images), each item of a scene is an unknown object with
    probability 1/2, and every scene has at least one that stays visible (the OOD scenes).
    """
    if pool.dim() != 3 or pool.shape[0] != pool_labels.shape[0] or len(pool) == 0:
        raise DataError(f"pool must be (m, h, w) images with m labels, got {tuple(pool.shape)} "
                        f"and {tuple(pool_labels.shape)}")
    if side < 2 * 28:
        raise DataError(f"side must be at least 56 pixels to hold two items, got {side}")
    rng = np.random.default_rng(seed)
    pools = {"known": pool, **(unknown or {})}
    kinds = sorted(unknown or {})
    images, labels, layouts = [], [], []
    for _ in range(n):
        background = _background(rng, side)
        noise = torch.from_numpy(rng.normal(0.0, PIXEL_NOISE, (side, side))).float()
        while True:
            items = []
            for _ in range(int(rng.integers(ITEMS[0], ITEMS[1] + 1))):
                size = round(28 * rng.uniform(*SCALES))
                top, left = (int(v) for v in rng.integers(0, side - size + 1, 2))
                if kinds and rng.random() < 0.5:
                    kind = kinds[int(rng.integers(len(kinds)))]
                    index, label = int(rng.integers(len(pools[kind]))), IGNORE
                else:
                    kind, index = "known", int(rng.integers(len(pool)))
                    label = 1 + int(pool_labels[index])
                items.append(Item(kind, index, label, size, top, left))
            image, label_map = render(tuple(items), pools, background, noise)
            if not kinds or bool((label_map == IGNORE).any()):
                break  # an OOD scene draws again until an unknown object shows
        images.append(image)
        labels.append(label_map)
        layouts.append(tuple(items))
    return Scenes(torch.stack(images)[:, None], torch.stack(labels), tuple(layouts))


def photo_patches(n: int, seed: int) -> torch.Tensor:
    """``n`` 28 x 28 patches of scikit-learn's two bundled photographs cut to an ellipse.

    Grey levels in [0, 1], 0 outside a random ellipse (so the threshold of :func:`render` cuts
    the object to it, less its darkest pixels). An unknown kind of object with the texture of a
    natural image, unlike any Fashion-MNIST item or digit.
    """
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(np.asarray(im, dtype=np.float32).mean(-1) / 255.0)
              for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    out = torch.empty(n, 28, 28)
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        crop = int(rng.integers(28, 85))  # 1x to 3x: some fine texture, some coarse
        top = int(rng.integers(0, photo.shape[0] - crop + 1))
        left = int(rng.integers(0, photo.shape[1] - crop + 1))
        patch = _resize(photo[top:top + crop, left:left + crop], 28)
        a, b = rng.uniform(0.55, 1.0, 2)
        inside = (xx / a) ** 2 + (yy / b) ** 2 <= 1.0
        # lift the grey levels above the threshold so the ellipse, not the photo, is the mask
        out[i] = torch.where(inside, 0.25 + 0.75 * patch, torch.zeros(()))
    return out


def load_scenes(*, seed: int = 0, side: int = 64, n_train: int = 4000, n_val: int = 500,
                n_test: int = 1000, n_ood: int = 500) -> SceneData:
    """The scene splits of the segmentation benchmark, all functions of ``seed``.

    Items come from :func:`load_fashion_mnist` (train / validation / test images, disjoint);
    OOD scenes from test items with unknown MNIST digits (:func:`load_mnist`) or photo patches
    (:func:`photo_patches`).
    """
    fm = load_fashion_mnist(seed=seed)
    digits, _ = load_mnist()
    unknown = {"mnist": digits[:, 0], "photo": photo_patches(2000, seed=seed + 7919)}
    ss = np.random.SeedSequence(seed).spawn(3 + len(unknown))
    seeds = [int(s.generate_state(1)[0]) for s in ss]
    kw = {"side": side}
    return SceneData(
        train=compose(fm.x_train[:, 0], fm.y_train, n_train, seed=seeds[0], **kw),
        val=compose(fm.x_val[:, 0], fm.y_val, n_val, seed=seeds[1], **kw),
        test=compose(fm.x_test[:, 0], fm.y_test, n_test, seed=seeds[2], **kw),
        ood={kind: compose(fm.x_test[:, 0], fm.y_test, n_ood, seed=seeds[3 + i],
                           unknown={kind: images}, **kw)
             for i, (kind, images) in enumerate(unknown.items())},
        side=side, seed=seed,
    )


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def shifted(images: torch.Tensor, kind: str, strength: int, *, seed: int = 0) -> torch.Tensor:
    """Return ``images`` (n, 1, h, w) corrupted by ``kind`` at ``strength`` 0 (none) to 5.

    ``"noise"``: Gaussian noise of standard deviation ``0.08 * strength``; ``"blur"``: a
    Gaussian blur of ``sigma = 0.5 * strength`` pixels; ``"contrast"``: each image pulled
    towards its mean by ``0.18 * strength``. Clipped to [0, 1]; the input is not modified.
    """
    if kind not in SHIFTS:
        raise DataError(f"shift kind must be one of {SHIFTS}, got {kind!r}")
    if isinstance(strength, bool) or not isinstance(strength, int) or not 0 <= strength <= 5:
        raise DataError(f"strength must be an int in 0..5, got {strength!r}")
    if strength == 0:
        return images.clone()
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        out = images + 0.08 * strength * torch.randn(images.shape, generator=g)
    elif kind == "blur":
        out = _gaussian_blur(images, 0.5 * strength)
    else:
        mean = images.mean((-2, -1), keepdim=True)
        out = mean + (1.0 - 0.18 * strength) * (images - mean)
    return out.clamp(0.0, 1.0)
