"""gapa: post-hoc epistemic uncertainty for frozen PyTorch networks (Gaussian Process Activations).

>>> import gapa
>>> gm = gapa.GAPA(model).fit(train_x)          # doctest: +SKIP
>>> out = gm(x)                                 # doctest: +SKIP
>>> torch.equal(out.mean, model(x))             # doctest: +SKIP
True
"""

from . import errors
from .core import ELEMENTWISE_ACTIVATIONS, GAPA
from .errors import (
    ConfigurationError,
    GAPAError,
    InputError,
    LayerError,
    ModelChangedError,
    ModelModeError,
    NonFiniteError,
    NotFittedError,
    StateFileError,
    UnsupportedOperationError,
)
from .moments import Moments
from .propagation import propagate

__version__ = "0.1.0"

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "GAPA",
    "ConfigurationError",
    "GAPAError",
    "InputError",
    "LayerError",
    "ModelChangedError",
    "ModelModeError",
    "Moments",
    "NonFiniteError",
    "NotFittedError",
    "StateFileError",
    "UnsupportedOperationError",
    "__version__",
    "errors",
    "propagate",
]
