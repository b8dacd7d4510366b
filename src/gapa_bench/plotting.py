"""Figures: the demo's (where GAPA's variance comes from, and what it buys on the test set) and
the classification benchmark's (reliability, OOD scores, rotation curves) and the segmentation
scenes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors
import matplotlib.patches
import matplotlib.pyplot as plt
import numpy as np


def demo_figure(
    path: Path,
    *,
    distance: dict[str, np.ndarray],
    variance: dict[str, np.ndarray],
    abs_error: np.ndarray,
    gapa_std: np.ndarray,
    map_std: float,
    title: str,
) -> Path:
    """Two panels: GAPA variance against distance to the nearest cached training activation
    (test set and shifted inputs), and |error| against GAPA's predictive sd on the test set."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, dist), color in zip(distance.items(), ["tab:blue", "tab:red", "tab:green"], strict=False):
        a.scatter(dist, variance[name], s=3, alpha=0.3, color=color, label=name, rasterized=True)
    a.set(xscale="log", yscale="log", xlabel="distance to nearest cached activation (scaled)",
          ylabel="GAPA output variance (raw)", title="Variance grows away from the training data")
    a.legend(markerscale=4)
    order = np.argsort(gapa_std)
    bins = np.array_split(order, 20)
    centers = [gapa_std[i].mean() for i in bins]
    b.plot(centers, [np.sqrt(np.mean(abs_error[i] ** 2)) for i in bins], "o-", label="RMSE per bin")
    lim = [min(centers), max(centers)]
    b.plot(lim, lim, "k--", lw=1, label="ideal (RMSE = sd)")
    b.axhline(map_std, color="tab:gray", ls=":", label=f"MAP sd ({map_std:.1f})")
    b.set(xlabel="GAPA predictive sd (minutes)", ylabel="test RMSE in bin (minutes)",
          title="Does the predicted sd track the error?")
    b.legend()
    fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------- classification


def classification_figures(folder: Path, results, labels, *, title: str = "") -> list[Path]:
    """The classification benchmark's three figures, from the ``ClassResult`` of every method
    (first seed of each for the per-input ones):

    - ``reliability.png``: accuracy against confidence in 15 equal-width bins on the test set;
    - ``ood_scores.png``: histograms of each method's own OOD score (its epistemic score, else
      the predictive entropy; ``ClassResult.headline_score``), test set against each OOD set;
    - ``rotation.png``: accuracy, NLL and ECE against the rotation angle (mean over seeds).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first = {}
    for r in results:
        first.setdefault(r.method, r)
    paths = [_reliability(folder / "reliability.png", first, labels, title)]
    if any(len(r.scores) > 1 for r in first.values()):
        paths.append(_score_histograms(folder / "ood_scores.png", first, title))
    if any(r.rotated for r in results):
        paths.append(_rotation_curves(folder / "rotation.png", results, title))
    return paths


def _reliability(path: Path, first: dict, labels, title: str) -> Path:
    y = np.asarray(labels)
    edges = np.linspace(0.0, 1.0, 16)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, r in first.items():
        probs = r.probs.double().numpy()
        conf, correct = probs.max(1), probs.argmax(1) == y
        bins = np.clip(np.digitize(conf, edges) - 1, 0, 14)
        used = [b for b in range(15) if (bins == b).any()]
        ax.plot([conf[bins == b].mean() for b in used], [correct[bins == b].mean() for b in used],
                "o-", ms=3, label=f"{name} (ECE {r.ece:.3f})")
    ax.set(xlabel="confidence (max probability)", ylabel="accuracy", title=f"Reliability {title}")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _score_histograms(path: Path, first: dict, title: str) -> Path:
    names = [n for n, r in first.items() if len(r.scores) > 1]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        r = first[name]
        score = r.headline_score
        scores = {k: v[score].double().numpy() for k, v in r.scores.items()}
        bins = np.histogram_bin_edges(np.concatenate(list(scores.values())), 50)
        for set_name, s in scores.items():
            label = "in distribution (test)" if set_name == "test" else f"OOD: {set_name}"
            ax.hist(s, bins=bins, density=True, alpha=0.5, label=label)
        auroc = ", ".join(f"{k} {v['auroc']:.3f}" for k, v in r.ood_scores[score].items())
        ax.set_title(f"{name} (AUROC {auroc})", fontsize=9)
        ax.set_xlabel(score.replace("_", " "), fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"OOD scores {title}")
    return _save(fig, path)


def _rotation_curves(path: Path, results, title: str) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    methods = list(dict.fromkeys(r.method for r in results))
    for name in methods:
        runs = [r for r in results if r.method == name and r.rotated]
        if not runs:
            continue
        angles = sorted(runs[0].rotated)
        for ax, key in zip(axes, ("accuracy", "nll", "ece"), strict=True):
            values = np.mean([[r.rotated[a][key] for a in angles] for r in runs], axis=0)
            ax.plot(angles, values, "o-", ms=3, label=name)
    for ax, key in zip(axes, ("accuracy", "NLL", "ECE"), strict=True):
        ax.set(xlabel="rotation (degrees)", ylabel=key, title=f"{key} under rotation")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Rotated test images {title}")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- segmentation


def scenes_figure(path: Path, scenes: dict[str, tuple[np.ndarray, np.ndarray]],
                  class_names: tuple[str, ...], per_set: int = 3) -> Path:
    """A grid of composed scenes (top row of each pair) over their label maps (bottom), a few per
    set; unknown objects (label < 0) are drawn white in the label map."""
    n = per_set * len(scenes)
    fig, axes = plt.subplots(2, n, figsize=(1.7 * n, 3.8), squeeze=False)
    colors = [plt.get_cmap("tab20")(k) for k in range(len(class_names))] + [(1.0, 1.0, 1.0, 1.0)]
    cmap = matplotlib.colors.ListedColormap(colors)
    col = 0
    for name, (images, labels) in scenes.items():
        for i in range(per_set):
            axes[0, col].imshow(images[i], cmap="gray", vmin=0, vmax=1)
            axes[0, col].set_title(f"{name} {i}", fontsize=8)
            shown = np.where(labels[i] < 0, len(class_names), labels[i])
            axes[1, col].imshow(shown, cmap=cmap, vmin=-0.5, vmax=len(class_names) + 0.5,
                                interpolation="nearest")
            col += 1
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [matplotlib.patches.Patch(color=cmap(k), label=c) for k, c in enumerate(class_names)]
    handles.append(matplotlib.patches.Patch(color=cmap(len(class_names)), label="unknown (OOD)"))
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.18)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def segmentation_figures(folder: Path, first: dict, scenes: dict, *, title: str = "") -> list[Path]:
    """The segmentation benchmark's figures from each method's ``SegResult.figure`` data (one
    seed), and ``scenes`` (``images``, ``labels``, ``unknown``, ``predicted`` of a few OOD
    scenes):

    - ``segmentation-maps.png``: per scene, the image, the labels (unknown objects white), the
      U-Net's errors, then each method's own score map;
    - ``segmentation-reliability.png``: pixel accuracy against confidence in 15 bins;
    - ``segmentation-ood.png``: histograms of each method's own score on the known and the
      unknown pixels of the OOD scenes.
    """
    folder = Path(folder)
    n, names = len(scenes["images"]), list(first)
    cols = 3 + len(names)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n), squeeze=False)
    for i in range(n):
        labels = scenes["labels"][i]
        errors = (scenes["predicted"][i] != labels) & ~scenes["unknown"][i]
        panels = [("scene", scenes["images"][i], "gray"),
                  ("labels", np.where(scenes["unknown"][i], -1, labels), "tab20"),
                  ("U-Net errors", errors, "gray")]
        panels += [(f"{m}\n{first[m].figure['score_name']}", first[m].figure["maps"][i], "magma")
                   for m in names]
        for ax, (name, image, cmap) in zip(axes[i], panels, strict=True):
            ax.imshow(image, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
    fig.suptitle(f"OOD scenes and per-pixel uncertainty {title}", fontsize=9)
    paths = [_save(fig, folder / "segmentation-maps.png")]

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, r in first.items():
        conf, acc = r.figure["reliability"]
        ax.plot(conf, acc, "o-", ms=3, label=f"{name} (ECE {r.ece:.3f})")
    ax.set(xlabel="confidence (max probability)", ylabel="pixel accuracy",
           title=f"Reliability per pixel {title}")
    ax.legend(fontsize=7)
    paths.append(_save(fig, folder / "segmentation-reliability.png"))

    rows = -(-len(names) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(12.6, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        known, unknown = first[name].figure["ood"]
        bins = np.histogram_bin_edges(np.concatenate([known, unknown]), 50)
        ax.hist(known, bins=bins, density=True, alpha=0.5, label="known pixels")
        ax.hist(unknown, bins=bins, density=True, alpha=0.5, label="unknown objects")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(first[name].figure["score_name"].replace("_", " "), fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Pixel OOD scores {title}")
    paths.append(_save(fig, folder / "segmentation-ood.png"))
    return paths
