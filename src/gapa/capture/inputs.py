"""Checks of the inputs of a GAPA and of the model they run through.

Shapes, dtypes, devices, finite values, a deterministic model, weights that have not changed:
checked, never repaired.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..adapters import output_tensor
from ..errors import ConfigurationError, InputError, ModelModeError, NonFiniteError
from ..propagation.engine import untracked, version

#: Names of the main tensor among named inputs, in order of preference (else the first tensor).
MAIN_INPUTS = ("input_ids", "inputs_embeds", "pixel_values")
#: The named input that marks padding (0) and real positions (1).
MASK = "attention_mask"


class Batch:
    """One batch of model inputs: a tensor, or named tensors (a dict, a ``BatchEncoding``).

    A tensor is run as ``model(x)``, named tensors as ``model(**inputs)``. The main tensor
    (:data:`MAIN_INPUTS`) is checked as a tensor input is; every named tensor whose first axis
    is the batch's is split with it. ``attention_mask`` (0 at padding) marks the positions that
    the fit leaves out of the cache and that get no GP variance at predict; with a key-value
    cache (``cache=``), its last columns are the inputs' own.

    Raises
    ------
    InputError
        Inputs that are neither a tensor nor a mapping holding one.
    """

    def __init__(self, inputs):
        if isinstance(inputs, Batch):
            inputs = inputs.inputs
        if isinstance(inputs, torch.Tensor):
            self.inputs, self.main, self.mask = inputs, inputs, None
            return
        if not isinstance(inputs, Mapping):
            raise InputError(
                "inputs must be a torch.Tensor or a mapping of named tensors (a dict, a "
                f"tokenizer's BatchEncoding), got {type(inputs).__name__}")
        named = dict(inputs)
        tensors = [k for k, v in named.items() if isinstance(v, torch.Tensor)]
        key = next((k for k in MAIN_INPUTS if k in tensors), tensors[0] if tensors else None)
        if key is None:
            raise InputError(f"the named inputs {sorted(named)} hold no tensor")
        self.inputs, self.main = named, named[key]
        mask = named.get(MASK)
        cached = named.get("cache", named.get("past_key_values")) is not None
        if cached and isinstance(mask, torch.Tensor) and mask.dim() == 2 and \
                self.main.dim() >= 2 and mask.shape[1] > self.main.shape[1]:
            mask = mask[:, -self.main.shape[1]:]  # with a key-value cache it covers the past too
        self.mask = mask

    @property
    def named(self) -> bool:
        """Whether the model is called with named inputs."""
        return not isinstance(self.inputs, torch.Tensor)

    def __len__(self) -> int:
        """Return the number of inputs (rows of the main tensor)."""
        return self.main.shape[0] if self.main.dim() else 0

    def run(self, model: nn.Module):
        """Return the model's output on this batch."""
        return model(**self.inputs) if self.named else model(self.inputs)

    def map(self, fn) -> Batch:
        """Return a batch of ``fn`` applied to every tensor of this one."""
        if not self.named:
            return Batch(fn(self.inputs))
        return Batch({k: fn(v) if isinstance(v, torch.Tensor) else v
                      for k, v in self.inputs.items()})

    def rows(self, start: int, stop: int | None = None) -> Batch:
        """Return rows ``start:stop`` (named tensors without the batch axis go whole)."""
        if not self.named:
            return Batch(self.inputs[start:stop])
        n = len(self)
        return Batch({k: v[start:stop] if has_batch_axis(v, n) else v
                      for k, v in self.inputs.items()})

    def split(self, size: int | None) -> list[Batch]:
        """Return batches of ``size`` rows: ``[self]`` for None or ``size >= len(self)``.

        Named tensors without the batch axis go to each. A ``size`` that is not a positive
        integer or None is a ConfigurationError.
        """
        check_batch_size(size)
        n = len(self)
        if size is None or n <= size:
            return [self]
        return [self.rows(i, i + size) for i in range(0, n, size)]


def check_batch_size(size) -> None:
    """Refuse a ``batch_size`` that is neither a positive integer nor None (ConfigurationError)."""
    if size is not None and (not isinstance(size, numbers.Integral) or isinstance(size, bool)
                             or size < 1):
        raise ConfigurationError(f"batch_size must be a positive integer or None, got {size!r}")


def is_token_ids(x: torch.Tensor) -> bool:
    """Return whether ``x`` holds integer ids (token ids) rather than values."""
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def real_positions(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return an attention mask as booleans that broadcast over ``like`` (batch, length, ...).

    On ``like``'s device.
    """
    real = mask.to(device=like.device, dtype=torch.bool)
    return real.reshape(*mask.shape, *[1] * (like.dim() - mask.dim()))


def has_batch_axis(value, n: int) -> bool:
    """Return whether ``value`` is a tensor whose first axis is a batch's of ``n`` rows."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n


def check_mask(batch: Batch) -> None:
    """Refuse an ``attention_mask`` that is not (batch, length) of 0s and 1s over the main input.

    Raises
    ------
    InputError
        Naming the shapes or the values.
    """
    mask = batch.mask
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or \
            tuple(mask.shape) != tuple(batch.main.shape[:2]):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(
            f"attention_mask of shape {shape} does not match the inputs of shape "
            f"{tuple(batch.main.shape)}: it must be (batch, length), 1 at real positions")
    if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must hold integers or booleans 0 and 1 (0 at padding), "
                         f"got {mask.dtype} values {mask.unique()[:5].tolist()}")


def check_input(x, model: nn.Module, shape: tuple[int, ...] | None,
                any_length: bool = False, ids: bool | None = None) -> None:
    """Refuse inputs that are not a tensor of the model's dtype and device, or not ``shape``.

    Parameters
    ----------
    x : torch.Tensor
        A batch of inputs.
    model : torch.nn.Module
        The network they go through (its first parameter gives the dtype and device).
    shape : tuple of int or None
        The shape of one input (without the batch axis); None skips the check.
    any_length : bool, default False
        Per-position queries: token ids (integer inputs) may have any length, only their rank
        is fixed, and images (floating inputs ``(batch, C, *spatial)`` with two or more spatial
        axes) any spatial size, only their rank and channels are fixed: what a GP query is (a
        position's units) depends on neither. Other floating inputs keep the fit's shape.
    ids : bool or None, default None
        Whether the fit's inputs were integer ids (None: unknown, not checked).

    Raises
    ------
    InputError
        ``x`` is not a tensor, has another shape, another floating dtype or device, or holds
        integers where the fit's inputs were floating (or the reverse).
    """
    if isinstance(x, Batch):
        check_mask(x)
        x = x.main
    if not isinstance(x, torch.Tensor):
        raise InputError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
    token_ids = is_token_ids(x)
    if ids is not None and token_ids != ids:
        kind = {True: "integer ids", False: "floating values"}
        raise InputError(
            f"inputs are {x.dtype} ({kind[token_ids]}) but the training inputs were "
            f"{kind[ids]}; pass inputs of the kind the model was fitted on")
    if shape is not None and token_ids and any_length:
        if x.dim() != len(shape) + 1:
            raise InputError(
                f"token ids of shape {tuple(x.shape)} do not have the training ids' rank: "
                f"(batch, {', '.join(map(str, shape))}); any length is accepted, another "
                "number of axes is not")
    elif shape is not None and any_length and x.is_floating_point() and len(shape) >= 3:
        if x.dim() != len(shape) + 1 or x.shape[1] != shape[0]:
            raise InputError(
                f"inputs of shape {tuple(x.shape)} do not match the training inputs, which were "
                f"(batch, {', '.join(map(str, shape))}); with per-position queries the rank and "
                f"the channels (axis 1, {shape[0]}) must be the fit's, the spatial size may differ")
    elif shape is not None and (x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape):
        what, fix = (("token ids", "with queries='per_input' every input must have the fit's "
                      "length (a GP query is a whole input)") if token_ids
                     else ("inputs", "check the feature count and rank"))
        raise InputError(
            f"{what} of shape {tuple(x.shape)} do not match the training {what}, which were "
            f"(batch, {', '.join(map(str, shape))}); {fix}"
        )
    param = next(model.parameters(), None)
    if param is not None and x.is_floating_point() and (
            x.dtype != param.dtype or x.device != param.device):
        raise InputError(
            f"inputs are {x.dtype} on {x.device} but the model's parameters are "
            f"{param.dtype} on {param.device}; convert one of them"
        )


def check_finite(x: torch.Tensor, what: str, offset: int = 0) -> None:
    """Raise a NonFiniteError naming the first rows of ``x`` with NaN or Inf.

    ``offset`` is the number of the first row of ``x`` in the whole data (for batches).
    """
    if isinstance(x, Batch):
        for name, value in (x.inputs.items() if x.named else [("", x.main)]):
            if isinstance(value, torch.Tensor):
                check_finite(value, f"{what} ({name})" if name else what, offset)
        return
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = ~torch.isfinite(x)
        rows = (bad.reshape(x.shape[0], -1).any(1).nonzero()[:5, 0] + offset).tolist()
        raise NonFiniteError(
            f"{what} contain {int(bad.sum())} NaN/Inf values (first rows: {rows}); "
            "GAPA does not repair inputs: remove or impute them first"
        )


@dataclass
class Seen:
    """What the training inputs of a fit showed.

    Their shape (without the batch axis), their number, the modules in training mode that
    proved deterministic on them, and whether they were token ids.
    """

    shape: tuple[int, ...] | None = None
    inputs: int = 0
    training: frozenset[str] = frozenset()
    ids: bool | None = None  #: whether they were integer ids (None: not seen, a refit from disk)


def weights_stamp(model: nn.Module) -> tuple:
    """Return the identity, storage and version counter of every parameter and buffer.

    A write through torch (an optimiser step, ``load_state_dict``, an in-place edit under
    no_grad), a replaced tensor or ``p.data = ...`` changes it. An in-place write through
    ``p.data`` does not (it bypasses the version counter): only :meth:`GAPA.save`, which hashes
    the weights, sees it.
    """
    with untracked():
        return tuple((id(t), t.data_ptr(), version(t))
                     for t in (*model.parameters(), *model.buffers()))


def check_deterministic(model: nn.Module, x: torch.Tensor | Batch) -> frozenset[str]:
    """Refuse a model whose forward pass is random or changes its own buffers.

    Dropout or BatchNorm left in training mode would: GAPA's mean must be the network's one
    fixed function. Only models with a module in training mode are run twice; their buffers
    are restored. Returns the names of the modules in training mode, now shown to be
    deterministic.
    """
    if not any(m.training for m in model.modules()):
        return frozenset()
    x = Batch(x)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    training = sorted({type(m).__name__ for m in model.modules() if m.training})
    try:
        device = x.main.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            first = output_tensor(x.run(model))
            second = output_tensor(x.run(model))
    except Exception as exc:  # e.g. BatchNorm in training mode on a one-row batch
        raise ModelModeError(
            f"the model is in training mode ({', '.join(training)}) and its forward pass failed "
            f"on the first training batch of shape {tuple(x.main.shape)} ({type(exc).__name__}: "
            f"{exc}); call model.eval() before fitting GAPA") from exc
    finally:
        changed = [k for k, b in model.named_buffers() if not torch.equal(b, buffers[k])]
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
    if changed or not torch.equal(first, second):
        why = (f"its forward pass changed the buffers {changed[:3]}" if changed
               else "two identical forward passes gave different outputs")
        raise ModelModeError(
            f"the model is in training mode ({', '.join(training)}) and {why}; call "
            "model.eval() before fitting GAPA (dropout and BatchNorm must be frozen)"
        )
    return frozenset(name for name, m in model.named_modules() if m.training)


def size_and_example(data, batch_size: int) -> tuple[int, torch.Tensor]:
    """Return how many inputs ``data`` holds and a batch of them, without consuming it.

    ``data``: a Tensor, a Dataset, or a DataLoader over a sized dataset (counted through its
    sampler, so a subset counts as such).
    """
    if isinstance(data, torch.Tensor):
        return len(data), data[:batch_size]
    items, batches_of_items = _sized(data)
    if items is None:
        raise InputError(
            "planning against a memory budget needs training data of known size: a Tensor, a "
            f"Dataset or a DataLoader over one, not a {type(data).__name__}")
    example = next(iter(iterate_inputs(data, batch_size)))
    return items * (len(Batch(example)) if batches_of_items else 1), example


def known_size(data) -> int | None:
    """Return how many inputs ``data`` holds when that is known without reading it.

    A Tensor, a sized Dataset, or a DataLoader over one that batches its items; None otherwise.
    """
    if isinstance(data, torch.Tensor):
        return len(data) if data.dim() else None
    items, batches_of_items = _sized(data)
    return None if items is None or batches_of_items else items


def _sized(data) -> tuple[int | None, bool]:
    """Return ``(items, whether every item is a batch)`` of a Dataset or DataLoader.

    ``items`` is None when the data have no length.
    """
    if isinstance(data, DataLoader):
        batches_of_items = data.batch_sampler is None  # batch_size=None: every item is a batch
        sized = data.sampler if batches_of_items else getattr(data.batch_sampler, "sampler",
                                                               data.dataset)
    else:
        batches_of_items, sized = False, data if isinstance(data, Dataset) else None
    try:
        return (len(sized) if hasattr(sized, "__len__") else None), batches_of_items
    except TypeError:  # an IterableDataset's sampler
        return None, batches_of_items


def iterate_inputs(data, batch_size: int) -> Iterable[torch.Tensor]:
    """Yield the input batches of ``data``.

    A Tensor, a Dataset, or a DataLoader (any iterable) of inputs, of ``(inputs, ...)`` tuples
    or of named inputs (dicts, a tokenizer's ``BatchEncoding``s).
    """
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise InputError("training data is a scalar tensor; give a (rows, features) tensor")
        yield from data.split(batch_size)
        return
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        if isinstance(data, TensorDataset) and len(data) == 0:
            return
        data = DataLoader(data, batch_size=batch_size)
    if not isinstance(data, DataLoader | Iterable):
        raise InputError(
            f"fit expects a Tensor, a TensorDataset or a DataLoader, got {type(data).__name__}"
        )
    for batch in data:
        yield batch[0] if isinstance(batch, list | tuple) else batch
