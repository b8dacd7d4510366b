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

from ..data.images import ImageData
from ..selection import Selection
from . import Fitted
from .scores import last_pass

K_NEIGHBOURS = 50
#: The ``k`` the benchmark may use: the paper's alone. ``k`` changes only the OOD score (the
#: probabilities are the MAP network's), and no validation quantity of in-distribution data
#: judges an OOD score: choosing ``k`` would need OOD data, i.e. the test sets. So ``k`` is
#: declared, not chosen, and a second candidate is refused.
K_CANDIDATES = (K_NEIGHBOURS,)
_BATCH = 2048


def _last_linear(model: nn.Module) -> nn.Linear:
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise LayerError(f"{type(model).__name__} has no nn.Linear head to take features from")
    return heads[-1]


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model(x)`` and the input of its last ``nn.Linear`` (in ``modules()`` order), flattened,
    from one forward pass in batches of 2048 without autograd, on ``x``'s device."""
    device = next(model.parameters()).device
    feats: list[torch.Tensor] = []
    handle = _last_linear(model).register_forward_pre_hook(
        lambda _, args: feats.append(args[0].flatten(1).to(x.device)))
    try:
        with torch.no_grad():
            out = torch.cat([model(xb.to(device)).to(x.device) for xb in x.split(_BATCH)])
    finally:
        handle.remove()
    return out, torch.cat(feats)


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``model``'s last ``nn.Linear`` (in ``named_modules`` order), flattened."""
    return logits_and_features(model, x)[1]


def fit_knn(backbone: nn.Module, data: ImageData, *, seed: int, progress: bool, train: dict,
            k: int | None = None) -> Fitted:
    """Index the normalised training features (exact faiss search); ``predict`` is the MAP
    softmax and ``ood_scores["distance"]`` the ``k``-th nearest-neighbour distance, both from
    one forward pass per input tensor. ``k`` defaults to the one declared candidate
    (:data:`K_CANDIDATES`); ``info["selection"]`` records it in the format of
    :class:`gapa_bench.selection.Selection`, with no score (no criterion chose it)."""
    candidates = K_CANDIDATES if k is None else (k,)
    if len(candidates) != 1:
        raise ConfigurationError(
            f"kNN's k has no validation criterion to choose among {candidates}: declare one")
    (k,) = candidates
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(data.x_train):
        raise ConfigurationError(f"k must be an int in [1, {len(data.x_train)}], got {k!r}")
    index = NeighbourIndex(normalised(penultimate_features(backbone, data.x_train)), "faiss")

    @last_pass
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, feats = logits_and_features(backbone, x)
        return torch.softmax(out, -1), normalised(feats)

    def distance(x: torch.Tensor) -> torch.Tensor:
        q = forward(x)[1]
        kth = index.points[index.search(q, k)[:, -1]]
        return (q - kth).norm(dim=1)

    selection = Selection({"k": [k]}, [({"k": k}, None)], {"k": k},
                          "declared (k changes only the OOD score; no validation data judges it)")
    return Fitted(lambda x: forward(x)[0], ood_scores={"distance": distance},
                  info={"k": k, "n_index": len(index), "selection": selection.record()})


def normalised(z: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (Sun et al.'s normalised features)."""
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
