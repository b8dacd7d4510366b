"""Greedy generation from a causal language model, with the variance of every new token.

Each step runs the new token alone through the model's key-value cache (transformers'
``DynamicCache``). The cache holds the means of past keys and values; GAPA carries their
variances beside them from one step to the next, so every step's diagonal variance is the one
the same token gets in a single pass over the whole sequence (tested), at the cost of one
token per step. What the cache does not carry: correlations between positions (the diagonal
rule has none to carry) and the Jacobian propagation's graph (refused here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .capture.inputs import Batch
from .errors import ConfigurationError, InputError, MissingDependencyError
from .moments import Moments

if TYPE_CHECKING:
    from .propagation import VarianceTracker

#: One pass of a GAPA over a batch, with the variances carried in from the previous step.
Step = Callable[[Batch, Sequence[tuple[torch.Tensor, torch.Tensor]]],
                tuple[Moments, "VarianceTracker"]]


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns."""

    tokens: torch.Tensor  #: (batch, new) the generated ids: the network's top token each step
    logits: Moments  #: (batch, new, vocabulary) the network's logits and their variance


def decode(step: Step, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
           max_new_tokens: int) -> Generation:
    """Generate ``max_new_tokens`` tokens greedily, with each token's logit moments.

    The loop of :meth:`gapa.GAPA.generate`, which checks the propagation and gives ``step``.

    Parameters
    ----------
    step : callable
        ``step(batch, carried) -> (moments, tracker)``: one diagonal pass of a fitted GAPA over
        a :class:`gapa.capture.inputs.Batch`, the variances of the cache's tensors from the
        previous step carried in.
    input_ids : torch.Tensor
        (batch, length) prompt ids.
    attention_mask : torch.Tensor, optional
        (batch, length), 0 at (left) padding; positions are counted from the first real token.
    max_new_tokens : int
        How many tokens to generate (>= 1).

    Returns
    -------
    Generation

    Raises
    ------
    ConfigurationError
        ``max_new_tokens`` < 1.
    MissingDependencyError
        Without transformers.
    InputError
        ``input_ids`` that are not (batch, length).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigurationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    try:
        from transformers import DynamicCache
    except ImportError as e:
        raise MissingDependencyError("generate needs transformers (pip install transformers)") from e
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InputError(f"input_ids must be a (batch, length) tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    cache, carried = DynamicCache(), []
    ids, tokens, means, variances = input_ids, [], [], []
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        batch = Batch({"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                       "cache": cache, "use_cache": True})
        moments, tracker = step(batch, carried)
        carried = [(t, v) for t in _cache_tensors(cache) if (v := tracker.var(t)) is not None]
        mean, var = moments.mean[:, -1], moments.var[:, -1]
        ids = mean.argmax(-1, keepdim=True)
        tokens.append(ids)
        means.append(mean)
        variances.append(var)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return Generation(torch.cat(tokens, 1),
                      Moments(torch.stack(means, 1), torch.stack(variances, 1)))


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Return the key and value tensors a transformers cache holds, layer by layer."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise InputError(f"a {type(cache).__name__} has no layers of keys and values to carry "
                         "variances in")
    return [t for layer in layers for name in ("keys", "values")
            if isinstance(t := getattr(layer, name, None), torch.Tensor)]
