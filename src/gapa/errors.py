"""Typed errors. Each class also subclasses the matching builtin, so ``except ValueError`` works."""

from __future__ import annotations


class GAPAError(Exception):
    """Root of every error this library raises on purpose."""


class NotFittedError(GAPAError, RuntimeError):
    """Prediction was asked for before :meth:`gapa.GAPA.fit`."""


class LayerError(GAPAError, ValueError):
    """A requested GAPA layer does not exist or is not an elementwise activation."""


class InputError(GAPAError, ValueError):
    """Inputs of the wrong shape, rank, dtype or device."""


class NonFiniteError(GAPAError, ValueError):
    """NaN or Inf in inputs or in cached activations."""


class EmptyDataError(GAPAError, ValueError):
    """The training set (or a cache built from it) is empty."""


class ConfigurationError(GAPAError, ValueError):
    """Inconsistent options, e.g. more neighbours than cached rows."""


class CacheTooLargeError(GAPAError, MemoryError):
    """The exact reference was asked for on a cache too large to invert."""


class UnsupportedOperationError(GAPAError, NotImplementedError):
    """An operation received an uncertain input and has no variance rule."""


class NumericalError(GAPAError, RuntimeError):
    """A factorisation failed even with the largest allowed jitter."""


class MissingDependencyError(GAPAError, ImportError):
    """An optional back end (e.g. faiss) is not installed."""


class ModelModeError(GAPAError, RuntimeError):
    """The model is not deterministic (dropout or BatchNorm left in training mode).

    Two identical forward passes differed or changed its buffers, or a module was put back in
    training mode after the fit.
    """


class StateFileError(GAPAError, OSError):
    """A saved GAPA state cannot be used; the subclass says why."""


class CorruptStateError(StateFileError):
    """The state file is truncated, not a GAPA file, or its contents fail their checksum."""


class FormatVersionError(StateFileError):
    """The state file was written in a format this version of gapa does not know."""


class ModelMismatchError(StateFileError):
    """The state was fitted on another model than the one it is loaded onto."""


class ArchitectureMismatchError(ModelMismatchError):
    """The model's modules or parameter shapes differ from those the state was fitted on."""


class WeightsMismatchError(ModelMismatchError):
    """Same architecture, other weights: the cached activations no longer match the model."""


class StoreMismatchError(StateFileError):
    """An activation store on disk belongs to another model, layer set or data order."""


class CorruptStoreError(CorruptStateError):
    """A shard or the manifest of an activation store fails its checks.

    Its size, shape, dtype or hash differs from the recorded one, or it points outside the store.
    """


class StoreLockedError(StateFileError):
    """Another live process is capturing into the same activation store."""


class ModelChangedError(GAPAError, RuntimeError):
    """The model's weights changed after GAPA was fitted: refit.

    The cached activations no longer describe the network, so its variances (and a saved state)
    would be wrong.
    """


class MemoryBudgetError(GAPAError, MemoryError):
    """The fit's plan exceeds the memory budget the user set."""


class DistributedError(GAPAError, RuntimeError):
    """A fit across the ranks of a ``torch.distributed`` process group failed on another rank.

    Also raised when the ranks cannot agree at all (a rank died, did not call ``fit`` or timed
    out), or when they captured inconsistent things (other weights, input shapes or the same
    inputs).
    """


def parse_enum(kind, value, name: str):
    """Return ``kind(value)``: an option given as its enum member or as its value.

    Parameters
    ----------
    kind : type[Enum]
        The option's enum.
    value : object
        The option as given.
    name : str
        The option's name, for the message.

    Raises
    ------
    ConfigurationError
        When ``value`` is not one of ``kind``'s; the message names ``name`` and lists them.
    """
    try:
        return kind(value)
    except ValueError:
        options = ", ".join(repr(v.value) for v in kind)
        raise ConfigurationError(f"unknown {name} {value!r}; use one of {options}") from None
