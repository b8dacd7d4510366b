"""gapa: post-hoc epistemic uncertainty for frozen PyTorch networks (Gaussian Process Activations).

>>> import gapa
>>> gm = gapa.GAPA(model).fit(train_x)          # doctest: +SKIP
>>> out = gm(x)                                 # doctest: +SKIP
>>> torch.equal(out.mean, model(x))             # doctest: +SKIP
True
"""

from .core import ELEMENTWISE_ACTIVATIONS, GAPA
from .errors import (
    ArchitectureMismatchError,
    CacheTooLargeError,
    ConfigurationError,
    CorruptStateError,
    CorruptStoreError,
    DataError,
    EmptyDataError,
    FormatVersionError,
    GAPAError,
    InputError,
    LayerError,
    MemoryBudgetError,
    MissingDependencyError,
    ModelChangedError,
    ModelMismatchError,
    ModelModeError,
    NonFiniteError,
    NotApplicableError,
    NotFittedError,
    NumericalError,
    StateFileError,
    StoreLockedError,
    StoreMismatchError,
    UnsupportedOperationError,
    WeightsMismatchError,
)
from .moments import Moments
from .propagation import propagate

__version__ = "0.1.0"

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "GAPA",
    "ArchitectureMismatchError",
    "CacheTooLargeError",
    "ConfigurationError",
    "CorruptStateError",
    "CorruptStoreError",
    "DataError",
    "EmptyDataError",
    "FormatVersionError",
    "GAPAError",
    "InputError",
    "LayerError",
    "MemoryBudgetError",
    "MissingDependencyError",
    "ModelChangedError",
    "ModelMismatchError",
    "ModelModeError",
    "Moments",
    "NonFiniteError",
    "NotApplicableError",
    "NotFittedError",
    "NumericalError",
    "StateFileError",
    "StoreLockedError",
    "StoreMismatchError",
    "UnsupportedOperationError",
    "WeightsMismatchError",
    "__version__",
    "propagate",
]
