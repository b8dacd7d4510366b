"""gapa: post-hoc epistemic uncertainty for frozen PyTorch networks (Gaussian Process Activations).

>>> import gapa
>>> gm = gapa.GAPA(model).fit(train_x)          # doctest: +SKIP
>>> out = gm(x)                                 # doctest: +SKIP
>>> torch.equal(out.mean, model(x))             # doctest: +SKIP
True
"""

from .core import ELEMENTWISE_ACTIVATIONS, GAPA
from .errors import (
    CacheTooLargeError,
    ConfigurationError,
    DataError,
    EmptyDataError,
    GAPAError,
    InputError,
    LayerError,
    MissingDependencyError,
    NonFiniteError,
    NotApplicableError,
    NotFittedError,
    NumericalError,
    UnsupportedOperationError,
)
from .moments import Moments
from .propagation import propagate

__version__ = "0.1.0"

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "GAPA",
    "CacheTooLargeError",
    "ConfigurationError",
    "DataError",
    "EmptyDataError",
    "GAPAError",
    "InputError",
    "LayerError",
    "MissingDependencyError",
    "Moments",
    "NonFiniteError",
    "NotApplicableError",
    "NotFittedError",
    "NumericalError",
    "UnsupportedOperationError",
    "__version__",
    "propagate",
]
