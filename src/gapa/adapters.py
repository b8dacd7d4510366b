"""What GAPA reads from the outputs of the networks it wraps.

Conventions of other libraries (Hugging Face ``transformers``' output objects) are kept here,
out of the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .errors import InputError


def output_tensor(out: Any) -> Tensor:
    """Return the prediction in a model's output.

    Parameters
    ----------
    out : Any
        What the model returned.

    Returns
    -------
    Tensor
        ``out`` itself when it is a tensor, else the ``logits`` tensor of a ``transformers``
        output or of a dict, else the first element of a tuple or list.

    Raises
    ------
    InputError
        When ``out`` is none of these.
    """
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise InputError(
        f"the model returned {type(out).__name__}; GAPA needs a Tensor, an output with a "
        "'logits' tensor (an attribute or a dict key), or a tuple whose first element is a "
        "Tensor"
    )
