"""What GAPA reads from the outputs of the networks it wraps: conventions of other libraries
(Hugging Face ``transformers``' output objects) kept out of the engine."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .errors import InputError


def output_tensor(out: Any) -> Tensor:
    """The prediction in a model's output: the tensor itself, the ``logits`` of a
    ``transformers`` output, or the first element of a tuple."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise InputError(
        f"the model returned {type(out).__name__}; GAPA needs a Tensor, an output with a "
        "'logits' tensor, or a tuple whose first element is a Tensor"
    )
