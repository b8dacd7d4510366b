"""The demo's figure: where GAPA's variance comes from, and what it buys on the test set."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
