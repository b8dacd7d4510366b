"""Deep nearest neighbours (Sun, Ming, Zhu & Li, ICML 2022): an OOD score only.

The score of an input is the distance from its L2-normalised penultimate features (the input of
the network's last ``nn.Linear``) to the ``k``-th nearest normalised training feature; the class
probabilities are the frozen network's softmax, untouched. The paper's ``k = 50`` is its
CIFAR-10 setting (50k training images, close to Fashion-MNIST's 55k).
"""

from __future__ import annotations

import torch
from torch import nn

from gapa.errors import ConfigurationError, LayerError
from gapa.gp.search import NeighbourIndex

from ..classifiers import logits
from ..data.images import ImageData
from . import Fitted

K_NEIGHBOURS = 50
_BATCH = 2048


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``model``'s last ``nn.Linear`` (in ``named_modules`` order), flattened."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise LayerError(f"{type(model).__name__} has no nn.Linear head to take features from")
    feats: list[torch.Tensor] = []
    handle = heads[-1].register_forward_pre_hook(lambda _, args: feats.append(args[0].flatten(1)))
    try:
        with torch.no_grad():
            for xb in x.split(_BATCH):
                model(xb)
    finally:
        handle.remove()
    return torch.cat(feats)


def fit_knn(backbone: nn.Module, data: ImageData, *, seed: int, progress: bool, train: dict,
            k: int = K_NEIGHBOURS) -> Fitted:
    """Index the normalised training features (exact faiss search); ``predict`` is the MAP
    softmax and ``ood_score`` the ``k``-th nearest-neighbour distance."""
    if not 1 <= k <= len(data.x_train):
        raise ConfigurationError(f"k must lie in [1, {len(data.x_train)}], got {k}")
    index = NeighbourIndex(_normalised(penultimate_features(backbone, data.x_train)), "faiss")

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits(backbone, x), -1)

    def ood_score(x: torch.Tensor) -> torch.Tensor:
        q = _normalised(penultimate_features(backbone, x))
        kth = index.points[index.search(q, k)[:, -1]]
        return (q - kth).norm(dim=1)

    return Fitted(predict, ood_score=ood_score,
                  info={"k": k, "n_index": len(index), "ood_score": f"distance to neighbour {k}"})


def _normalised(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
