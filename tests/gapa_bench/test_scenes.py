"""The segmentation scenes: deterministic, labels that match the pasted images, no image in two
splits, unknown objects marked, shifts of increasing strength."""

from __future__ import annotations

import itertools

import pytest
import torch

from gapa_bench.data import scenes as sc
from gapa_bench.data.images import _FILES, FASHION_MNIST_DIR
from gapa_bench.errors import DataError
from helpers import item_pool

needs_fashion = pytest.mark.skipif(
    not all((FASHION_MNIST_DIR / f"{s}.gz").is_file() for s in _FILES.values()),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR}")


def test_the_same_seed_gives_the_same_scenes():
    pool, labels = item_pool(30, 0)
    a, b = (sc.compose(pool, labels, 6, side=64, seed=3) for _ in range(2))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.items == b.items
    c = sc.compose(pool, labels, 6, side=64, seed=4)
    assert not torch.equal(a.images, c.images)


def test_labels_match_the_pasted_images(monkeypatch):
    """Without pixel noise: a labelled pixel shows an item's pixel above the threshold, a
    background pixel the texture, the top item is pasted as it is, and the items alone give
    the label map."""
    monkeypatch.setattr(sc, "PIXEL_NOISE", 0.0)
    pool, classes = item_pool(40, 1)
    s = sc.compose(pool, classes, 12, side=64, seed=5)
    assert s.images.shape == (12, 1, 64, 64) and s.labels.shape == (12, 64, 64)
    img = s.images[:, 0]
    assert bool((img[s.labels > 0] > sc.ITEM_THRESHOLD).all())
    assert bool((img[s.labels == 0] <= sc.BACKGROUND_LEVEL + 1e-6).all())
    for i, items in enumerate(s.items):
        assert sc.ITEMS[0] <= len(items) <= sc.ITEMS[1]
        top = items[-1]  # nothing covers the last item
        assert top.label == 1 + int(classes[top.index])
        patch = sc._resize(pool[top.index], top.size)
        window = (slice(top.top, top.top + top.size), slice(top.left, top.left + top.size))
        mask = patch > sc.ITEM_THRESHOLD
        assert bool(mask.any())
        assert bool((s.labels[i][window][mask] == top.label).all())
        assert torch.equal(img[i][window][mask], patch[mask])
        zeros = torch.zeros(64, 64)
        _, relabelled = sc.render(items, {"known": pool}, zeros, zeros)
        assert torch.equal(relabelled, s.labels[i])


def test_ood_scenes_mark_every_unknown_pixel():
    pool, classes = item_pool(30, 2)
    strange, _ = item_pool(10, 3)
    s = sc.compose(pool, classes, 10, side=64, seed=6, unknown={"odd": strange})
    assert bool(s.unknown.flatten(1).any(1).all())  # each scene shows one
    zeros = torch.zeros(64, 64)
    for i, items in enumerate(s.items):
        kinds = {it.kind for it in items}
        assert "odd" in kinds
        _, relabelled = sc.render(items, {"known": pool, "odd": strange}, zeros, zeros)
        assert torch.equal(relabelled == sc.IGNORE, s.unknown[i])


def test_bad_pools_and_shifts_are_refused():
    pool, classes = item_pool(5, 4)
    with pytest.raises(DataError, match="pool"):
        sc.compose(pool, classes[:3], 2, side=64, seed=0)
    with pytest.raises(DataError, match="side"):
        sc.compose(pool, classes, 2, side=40, seed=0)
    with pytest.raises(DataError, match="kind"):
        sc.shifted(torch.zeros(1, 1, 8, 8), "rain", 1)
    with pytest.raises(DataError, match="strength"):
        sc.shifted(torch.zeros(1, 1, 8, 8), "blur", 6)


@pytest.mark.parametrize("kind", sc.SHIFTS)
def test_shifts_grow_with_their_strength(kind):
    pool, classes = item_pool(20, 5)
    images = sc.compose(pool, classes, 4, side=64, seed=7).images
    before = images.clone()
    assert torch.equal(sc.shifted(images, kind, 0), images)
    gaps = [float((sc.shifted(images, kind, k) - images).abs().mean()) for k in range(1, 6)]
    assert all(a < b for a, b in itertools.pairwise(gaps)), gaps
    out = sc.shifted(images, kind, 5)
    assert out.shape == images.shape and bool(((out >= 0) & (out <= 1)).all())
    assert torch.equal(images, before)


def test_photo_patches_are_ellipses_of_real_photographs():
    patches = sc.photo_patches(8, seed=0)
    assert patches.shape == (8, 28, 28)
    inside = patches > sc.ITEM_THRESHOLD
    assert bool((patches[~inside] == 0).all())  # nothing but the ellipse passes the threshold
    assert bool((inside.flatten(1).float().mean(1) > 0.2).all())
    assert float(patches[inside].std()) > 0.02  # a photograph's texture, not a flat fill
    assert torch.equal(patches, sc.photo_patches(8, seed=0))


@needs_fashion
def test_no_image_is_in_two_splits():
    """The items of train, validation and test scenes come from disjoint image sets; MNIST and
    photo objects only appear in the OOD scenes."""
    from gapa_bench.data.images import load_fashion_mnist

    data = sc.load_scenes(n_train=60, n_val=30, n_test=30, n_ood=20)
    fm = load_fashion_mnist(seed=0)
    pools = {"train": fm.x_train[:, 0], "val": fm.x_val[:, 0], "test": fm.x_test[:, 0]}
    used = {}
    for split, scenes in (("train", data.train), ("val", data.val), ("test", data.test)):
        assert {it.kind for items in scenes.items for it in items} == {"known"}
        for image, items in zip(scenes.images[:, 0], scenes.items, strict=True):
            top = items[-1]  # the image shows this pool's item, up to the pixel noise
            patch = sc._resize(pools[split][top.index], top.size)
            mask = patch > sc.ITEM_THRESHOLD
            window = (slice(top.top, top.top + top.size), slice(top.left, top.left + top.size))
            gap = (image[window][mask] - patch[mask]).abs().mean()
            assert float(gap) < 2 * sc.PIXEL_NOISE
        used[split] = {pools[split][it.index].numpy().tobytes()
                       for items in scenes.items for it in items}
    assert not used["train"] & used["val"]
    assert not used["train"] & used["test"]
    assert not used["val"] & used["test"]
    for kind, scenes in data.ood.items():
        assert {it.kind for items in scenes.items for it in items} <= {"known", kind}
        assert bool(scenes.unknown.flatten(1).any(1).all())
    assert data.n_classes == 11 and data.train.images.shape[1:] == (1, 64, 64)
