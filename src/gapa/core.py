"""``gapa.GAPA``: the front door. Wrap a frozen network, fit on training inputs, predict moments."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import output_tensor
from .capture.distributed import (
    RANKS,
    joined_rows,
    on_every_rank,
    process_group,
    rank_store_name,
    rank_stores,
    read_ranks,
    write_ranks,
)
from .capture.hooks import call_sites, require_calls
from .capture.inputs import (
    Batch,
    Seen,
    check_batch_size,
    check_deterministic,
    check_finite,
    check_input,
    is_token_ids,
    iterate_inputs,
    known_size,
    real_positions,
    size_and_example,
    weights_stamp,
)
from .capture.prefix import replaying_prefix
from .capture.store import MANIFEST, ActivationStore
from .capture.streaming import stream_to_store
from .errors import (
    ConfigurationError,
    DistributedError,
    EmptyDataError,
    InputError,
    LayerError,
    ModelChangedError,
    ModelModeError,
    NonFiniteError,
    NotFittedError,
    parse_enum,
)
from .gp.kernels import check_overrides
from .gp.search import SearchBackend
from .gp.site import Conditioning, GPConfig, GPSite, Inducing
from .moments import Moments, all_finite
from .persistence import load_state, model_device, model_fingerprint, same_model, save_state
from .plan import Plan, machine_memory, plan_fit
from .predictive.classification import (
    ClassPrediction,
    Method,
    OODScore,
    VarianceScaleFit,
    fit_variance_scale,
    predict_classes,
    scored_positions,
)
from .predictive.regression import Calibration, fit_scale_and_noise
from .predictive.validation import parse_lengthscale_factors
from .propagation import VarianceTracker, tracking
from .propagation.elementwise import TRANSFORMERS_ACTIVATIONS
from .propagation.engine import plain_fast_paths, untracked
from .propagation.jacobian import combine_jacobian, jacobian_parts

#: Activation modules GAPA can turn into GP activations (elementwise, one input, one output).
ELEMENTWISE_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.Softplus,
    nn.Mish, nn.SELU, nn.CELU, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Softsign,
)


class Propagation(str, Enum):
    """How the GP variance reaches the output (see :class:`GAPA`)."""

    DIAGONAL = "diagonal"
    """One pass with the per-operation rules of :mod:`gapa.propagation` (any network)."""
    JACOBIAN = "jacobian"
    """The exact first-order variance by one backward pass per output unit (few outputs)."""


#: Lengthscale multipliers :meth:`GAPA.calibrate` and :meth:`GAPA.calibrate_classifier` choose
#: from by validation NLL. The label-free rule sets the lengthscale's order of magnitude; how fast
#: the variance should grow away from the data depends on the task, and the labels say so. The
#: grid spans 1/16 ... 8 (benchmarks/HISTORY.md).
LENGTHSCALE_FACTORS = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def is_activation(module: nn.Module) -> bool:
    """Return whether GAPA can make ``module`` a GP activation.

    It can when ``module`` is an elementwise activation of torch (one of
    :data:`ELEMENTWISE_ACTIVATIONS`) or of ``transformers.activations``.

    Parameters
    ----------
    module : nn.Module
        The module to test.

    Returns
    -------
    bool
        True for a supported elementwise activation module.
    """
    return isinstance(module, ELEMENTWISE_ACTIVATIONS) or (
        type(module).__module__ == "transformers.activations"
        and type(module).__name__ in TRANSFORMERS_ACTIVATIONS
    )


def units_last(z: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Move the unit axis of an activation last (with ``inverse``, back to axis 1).

    Feature maps of 2-D and 3-D convolutions (4 or 5 dimensions) are channel-first in PyTorch:
    their channels are the units and every spatial position is one query. For 2- and
    3-dimensional activations (MLPs, transformers' (batch, tokens, width)) the last axis holds
    the units; a Conv1d feature map (N, C, L) would be read as L units, so GAPA layers in Conv1d
    networks belong after the flatten.

    Parameters
    ----------
    z : torch.Tensor
        An activation, batch axis first.
    inverse : bool, default False
        Undo the move: put the last axis back at axis 1.

    Returns
    -------
    torch.Tensor
        ``z`` itself when it has fewer than 4 dimensions, else ``z`` with the axis moved.
    """
    if z.dim() < 4:
        return z
    return z.movedim(-1, 1) if inverse else z.movedim(1, -1)


#: Rows per forward pass of ``fit``, :meth:`GAPA.moments`, ``predict``, ``classify`` and
#: ``calibrate_classifier`` (``gm(x)`` itself is one pass).
BATCH_SIZE = 1024
#: Most tokens per forward pass of a fit on a tensor of token ids, by default: a batch of
#: :data:`BATCH_SIZE` sequences of a language model's length would hold gigabytes of activations.
FIT_TOKENS = 16384


def fit_batch_size(data, batch_size: int | None) -> int:
    """Return ``batch_size``, or by default :data:`BATCH_SIZE` rows, fewer for token ids.

    A tensor of token ids (integers, batch x length) gets at most :data:`FIT_TOKENS` tokens
    per pass.
    """
    if batch_size is not None:
        check_batch_size(batch_size)
        return batch_size
    if isinstance(data, torch.Tensor) and data.dim() >= 2 and is_token_ids(data):
        return max(1, min(BATCH_SIZE, FIT_TOKENS // math.prod(data.shape[1:])))
    return BATCH_SIZE

class Queries(str, Enum):
    """What one GP query is (see :class:`GAPA`)."""

    PER_POSITION = "per_position"
    """Every spatial position (token) of an activation is a query over its channels."""
    PER_INPUT = "per_input"
    """Each input is one query over all the activation's values but the batch axis."""


class GAPA:
    """Gaussian Process Activations around a frozen network.

    Wrap a trained network, :meth:`fit` on training inputs (no labels), then ``gm(x)`` returns
    the network's own output and its epistemic variance (:class:`gapa.Moments`).

    Parameters
    ----------
    model : nn.Module
        The trained network; it is never modified. Put it in eval mode first.
    layers : str or sequence of str or None, default "auto"
        Names from ``model.named_modules()`` of elementwise activation modules (torch's or
        ``transformers.activations``') to make GP activations. ``"auto"`` (default, also
        ``None``): the last such module in ``named_modules()`` order, which is the activation
        feeding the head: an MLP's last hidden layer, a ResNet's last block output (before the
        pooling and the classifier), the MLP of a transformer's last block. A module called
        several times in ``forward`` gives one call site per call, each with its own cache
        (``"act"``, ``"act#1"``, ...).
    k : int, default 1
        Neighbours each query is conditioned on (local conditioning); ``k=1`` is the closed
        form.
    m : int or None, default 512
        Inducing points per call site (k-means on the cache); ``None`` conditions on the whole
        cache.
    conditioning : {"local", "exact", "prior"}, default "local"
        ``"local"`` (K nearest neighbours), ``"exact"`` (the whole conditioning set; the slow
        reference, refused above :data:`gapa.gp.conditioning.EXACT_MAX_ROWS` rows) or
        ``"prior"`` (no conditioning, every unit at its prior amplitude: a control that shows
        what conditioning adds).
    search : {"exact", "torch", "faiss", "ivf", "hnsw", "auto"}, default "exact"
        Neighbour search back end (:class:`gapa.gp.search.SearchBackend`). ``"exact"`` takes,
        per call, faiss's flat search for large query batches on the CPU (dense outputs: a
        query per pixel) and torch's otherwise; ``"torch"`` is exact on any device; ``"faiss"``
        exact flat; ``"ivf"`` and ``"hnsw"`` approximate; ``"auto"`` is ``"exact"`` up to
        :data:`gapa.gp.search.AUTO_EXACT_MAX_ROWS` rows and ``"ivf"`` above.
    inducing : {"kmeans", "random"}, default "kmeans"
        How the M inducing points are chosen.
    noise_by_count : bool, default True
        Give an inducing point standing for ``n`` training rows the noise ratio divided by
        ``n``, so that dense regions of activation space are more certain.
    lengthscale_rule : {"quantile", "marginal_likelihood"}, default "quantile"
        How a unit's lengthscale is set: the ``lengthscale_quantile`` of pairwise
        pre-activation distances, or the GP's own marginal likelihood of the unit's cached
        activations (:mod:`gapa.gp.likelihood`; label-free as well).
    lengthscale_quantile : float, default 0.25
        The quantile of pairwise pre-activation distances taken as a unit's lengthscale by the
        ``"quantile"`` rule.
    amplitude_rule : {"max1", "variance", "unit", "marginal_likelihood"}, default "max1"
        The prior variance of each unit.
    noise_ratio : float, default 1e-2
        The noise of one cached row relative to the unit's amplitude. These make the
        label-free hyperparameter rule (see :func:`gapa.gp.kernels.estimate_hyperparameters`).
    hyperparameters : Mapping or None, default None
        Per-layer (or per-call-site) overrides: ``{"net.5": {"lengthscale": 0.5}}``; values are
        scalars or per-unit tensors for ``lengthscale`` and ``amplitude``, a float for
        ``noise_ratio`` (the noise of one cached row relative to the unit's amplitude; not the
        output noise that :meth:`calibrate` fits).
    propagation : {"diagonal", "jacobian"}, default "diagonal"
        How the GP variance reaches the output. ``"diagonal"`` (default): one forward pass with
        the per-operation rules of :mod:`gapa.propagation` (any architecture; units treated as
        independent after each operation). ``"jacobian"``: the exact first-order variance
        ``sum_j (d y / d h_j)^2 v_j`` over the GAPA units, with one backward pass per output
        unit of a sample, so it keeps the correlations that mixing layers create (regressors
        and classifiers with few outputs; not language models). Needs a model whose rows along
        dim 0 are independent (eval mode).
    queries : {"per_position", "per_input"}, default "per_position"
        What one GP query is (:class:`Queries`). ``"per_position"``: every spatial position of
        a feature map (every token of a sequence) is a query over the channels, as
        :func:`units_last` reads them. ``"per_input"``: every element of the activation but the
        batch axis is a unit and each input is one query, so the neighbours are whole training
        inputs' feature maps (fixed shapes only; the cache holds one row of C x H x W values per
        training input): an input is near the data only when its whole feature map is near a
        training input's.
    seed : int, default 0
        Seed of every random choice (subsamples, k-means).

    Raises
    ------
    InputError
        When ``model`` is not a ``torch.nn.Module``.
    LayerError
        When a name in ``layers`` is not a module of ``model`` or not an elementwise
        activation, ``model`` has no such module (``"auto"``), or ``hyperparameters`` names a
        layer that is not a GAPA layer.
    ConfigurationError
        When an option is out of range or not one of its choices.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).eval()
    >>> gm = GAPA(model).fit(torch.randn(200, 4))
    >>> out = gm(torch.randn(3, 4))
    >>> out.mean.shape, out.var.shape
    (torch.Size([3, 1]), torch.Size([3, 1]))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | str | None = "auto",
        *,
        k: int = 1,
        m: int | None = 512,
        conditioning: str = "local",
        search: str = "exact",
        inducing: str = "kmeans",
        noise_by_count: bool = True,
        lengthscale_quantile: float = 0.25,
        amplitude_rule: str = "max1",
        noise_ratio: float = 1e-2,
        lengthscale_rule: str = "quantile",
        hyperparameters: Mapping[str, Mapping] | None = None,
        propagation: str = "diagonal",
        queries: str = "per_position",
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(k, int) or k < 1:
            raise ConfigurationError(f"k must be a positive integer, got {k!r}")
        if m is not None and (not isinstance(m, int) or m < 1):
            raise ConfigurationError(f"m must be a positive integer or None, got {m!r}")
        self.model = model
        self.layers = self._resolve_layers(model, layers)
        self._auto_layer = layers is None or layers == "auto"
        self.config = GPConfig(
            k=k, m=m, conditioning=parse_enum(Conditioning, conditioning, "conditioning"),
            search=parse_enum(SearchBackend, search, "search"),
            inducing=parse_enum(Inducing, inducing, "inducing"), noise_by_count=noise_by_count,
            lengthscale_quantile=lengthscale_quantile, amplitude_rule=amplitude_rule,
            noise_ratio=noise_ratio, seed=seed, lengthscale_rule=lengthscale_rule,
        )
        self.propagation = propagation
        self.queries = parse_enum(Queries, queries, "queries")
        check_overrides(hyperparameters or {})
        self._overrides = dict(hyperparameters or {})
        unknown = {name.split("#")[0] for name in self._overrides} - set(self.layers)
        if unknown:
            raise LayerError(
                f"hyperparameters given for {sorted(unknown)}, which are not GAPA layers "
                f"({self.layers})"
            )
        self._sites: dict[str, GPSite] = {}
        #: model_fingerprint() of the network when the cache was captured (None before a fit)
        self._fingerprint: dict | None = None
        self._input_shape: tuple[int, ...] | None = None
        self._input_ids: bool | None = None  # whether the fit's inputs were integer ids
        self._fit_inputs = 0  # training inputs of the last fit
        self._calibration: Calibration | None = None
        self._class_calibration: VarianceScaleFit | None = None
        self._factor = 1.0  # of the fitted lengthscales (see lengthscale_factor)
        #: modules in training mode at fit that proved deterministic there
        self._training_ok: frozenset[str] = frozenset()
        #: (id, version) of every weight when last checked against the fingerprint
        self._stamp: tuple = ()

    # --- configuration ---------------------------------------------------------------------------

    @staticmethod
    def _resolve_layers(model: nn.Module, layers: Sequence[str] | str | None) -> list[str]:
        modules = dict(model.named_modules())
        if layers is None or layers == "auto":
            found = [n for n, mod in modules.items() if is_activation(mod)]
            if not found:
                raise LayerError(
                    f"{type(model).__name__} has no elementwise activation module "
                    f"({', '.join(t.__name__ for t in ELEMENTWISE_ACTIVATIONS)}); pass layers=[...]"
                )
            return [found[-1]]
        names = [layers] if isinstance(layers, str) else \
            list(layers) if isinstance(layers, Iterable) else None
        if names is None or not all(isinstance(name, str) for name in names):
            raise LayerError(
                "layers must be 'auto', a module name or a sequence of module names (from "
                f"model.named_modules()), got {layers!r}")
        if not names:
            raise LayerError("layers is empty; give at least one activation module name")
        for name in names:
            if name not in modules:
                close = [n for n in modules if n and (name in n or n in name)][:5]
                raise LayerError(
                    f"no module named {name!r} in {type(model).__name__}"
                    + (f"; did you mean one of {close}?" if close else "")
                    + " (names come from model.named_modules())"
                )
            if not is_activation(modules[name]):
                raise LayerError(
                    f"module {name!r} is a {type(modules[name]).__name__}, not an elementwise "
                    "activation; GAPA layers must be one of "
                    f"{', '.join(t.__name__ for t in ELEMENTWISE_ACTIVATIONS)}"
                )
        return list(dict.fromkeys(names))

    # --- fitted state -------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        """Whether this GAPA holds fitted call sites (:meth:`fit`, :meth:`load`, ...)."""
        return bool(self._sites)

    @property
    def sites(self) -> Mapping[str, GPSite]:
        """Fitted call sites by key (read-only): cache size, hyperparameters, conditioning set.

        Raises
        ------
        NotFittedError
            Before a fit.
        """
        self._require_fitted("read the fitted sites")
        return MappingProxyType(self._sites)

    def summary(self) -> str:
        """Describe what was fitted, one line per call site.

        Returns
        -------
        str
            One line per call site, as :meth:`gapa.gp.site.GPSite.describe` writes it.

        Raises
        ------
        NotFittedError
            Before a fit.
        """
        self._require_fitted("summarise")
        return "\n".join(site.describe() for site in self._sites.values())

    @property
    def calibration(self) -> Calibration | None:
        """The regression calibration (:meth:`calibrate`), or None.

        A refit, or a calibration that changes the lengthscale factor, drops it.
        """
        return self._calibration

    @property
    def propagation(self) -> Propagation:
        """How the GP variance reaches the output (:class:`Propagation`).

        It may be switched on a fitted GAPA; setting a value that is not a :class:`Propagation`
        raises :class:`gapa.errors.ConfigurationError`.
        """
        return self._propagation

    @propagation.setter
    def propagation(self, value: Propagation | str) -> None:
        self._propagation = parse_enum(Propagation, value, "propagation")

    @property
    def class_calibration(self) -> VarianceScaleFit | None:
        """The classification calibration (:meth:`calibrate_classifier`), or None.

        A refit, or a calibration that changes the lengthscale factor, drops it.
        """
        return self._class_calibration

    @property
    def lengthscale_factor(self) -> float:
        """The factor every call site's fitted lengthscales are multiplied by.

        It is 1 after a fit; :meth:`calibrate` and :meth:`calibrate_classifier` choose it on
        validation. Setting it to a new value rescales the sites and drops the calibrations,
        which were fitted at another factor.

        Raises
        ------
        ConfigurationError
            On setting a value that is not a positive finite number.
        NotFittedError
            On setting it before a fit.
        """
        return self._factor

    @lengthscale_factor.setter
    def lengthscale_factor(self, factor: float) -> None:
        (factor,) = parse_lengthscale_factors([factor], "lengthscale_factor")
        self._require_fitted("set the lengthscale factor")
        self._commit_factor(factor)

    def _set_factor(self, factor: float) -> None:
        """Rescale every site, all or none: a failure puts back the factor in force."""
        try:
            self._rescale_lengthscales(factor)
        except BaseException:
            self._rescale_lengthscales(self._factor)
            raise
        self._factor = factor

    def options(self) -> dict:
        """Return the constructor's keyword arguments (JSON-safe).

        ``GAPA(model, **gm.options())`` builds an unfitted twin of this GAPA.

        Returns
        -------
        dict
            Every keyword argument of :class:`GAPA` but ``model``; options as their strings,
            tensor overrides as lists.
        """
        cfg = self.config
        overrides = {
            name: {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in hp.items()}
            for name, hp in self._overrides.items()
        }
        return {
            "layers": list(self.layers), "k": cfg.k, "m": cfg.m,
            "conditioning": cfg.conditioning.value, "search": cfg.search.value,
            "inducing": cfg.inducing.value, "noise_by_count": cfg.noise_by_count,
            "lengthscale_quantile": cfg.lengthscale_quantile,
            "amplitude_rule": cfg.amplitude_rule.value, "noise_ratio": cfg.noise_ratio,
            "lengthscale_rule": cfg.lengthscale_rule.value, "hyperparameters": overrides,
            "propagation": self.propagation.value,
            "queries": self.queries.value, "seed": cfg.seed,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted state to ``path``, atomically.

        One safetensors file with JSON metadata, no pickle; an interrupted save leaves any
        previous file intact. Load it with :meth:`GAPA.load` onto the same network.

        Parameters
        ----------
        path : str or os.PathLike
            The file to write.

        Returns
        -------
        Path
            ``path`` as a :class:`pathlib.Path`.

        Raises
        ------
        NotFittedError
            Before a fit.
        ModelChangedError
            When the model's weights changed since the fit (nothing is written).
        StateFileError
            When ``path`` is a directory or cannot be written (permissions, a missing or
            read-only directory, a full disk); nothing is written.
        """
        self._require_fitted("save")
        return save_state(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module,
             map_location: str | torch.device | None = None) -> GAPA:
        """Load the GAPA saved at ``path`` around ``model``.

        ``model`` must be the network it was fitted on: its architecture and weights are
        checked against the fingerprint in the file (see :func:`gapa.persistence.load_state`).

        Parameters
        ----------
        path : str or os.PathLike
            A file written by :meth:`save`.
        model : nn.Module
            The network the state was fitted on.
        map_location : str or torch.device or None, default None
            The device for the state's tensors; ``None`` takes the model's.

        Returns
        -------
        GAPA
            The fitted GAPA.

        Raises
        ------
        StateFileError
            A subclass of :class:`gapa.StateFileError` says what is wrong with the file.
        ConfigurationError
            A ``map_location`` that is not a device this torch can use.
        InputError
            When ``model`` is not a ``torch.nn.Module``.

        Warns
        -----
        FormatWarning
            When the file is in an older format (it loads; saving it again upgrades it).
        """
        return load_state(cls, path, model, map_location)

    def state_dict(self) -> dict:
        """Return everything this fitted GAPA holds besides the model.

        For :mod:`gapa.persistence` (or your own storage): the options, the model's fingerprint
        taken at fit, the fitted inputs' shape and count, the modules proven deterministic in
        training mode, the lengthscale factor, the calibrations and the
        :class:`gapa.gp.site.GPSite` of every call site. :meth:`load_state_dict` installs such
        a dict on a GAPA with the same options.

        Returns
        -------
        dict
            Keys ``"options"``, ``"model"``, ``"input_shape"``, ``"input_ids"``, ``"fit_inputs"``,
            ``"training_ok"``, ``"lengthscale_factor"``, ``"calibration"``,
            ``"class_calibration"`` and ``"sites"``.

        Raises
        ------
        NotFittedError
            Before a fit.
        """
        self._require_fitted("export its state")
        return {
            "options": self.options(), "model": dict(self._fingerprint or {}),
            "input_shape": self._input_shape, "input_ids": self._input_ids,
            "fit_inputs": self._fit_inputs,
            "training_ok": sorted(self._training_ok), "lengthscale_factor": self._factor,
            "calibration": self._calibration, "class_calibration": self._class_calibration,
            "sites": dict(self._sites),
        }

    def load_state_dict(self, state: Mapping) -> GAPA:
        """Install a :meth:`state_dict`, its sites already at its lengthscale factor.

        The model's fingerprint defaults to the model's own now; nothing is changed when a key
        is missing or a value is of the wrong kind.

        Parameters
        ----------
        state : Mapping
            A dict as :meth:`state_dict` returns it; ``"model"``, ``"input_ids"``,
            ``"fit_inputs"`` and ``"training_ok"`` may be left out.

        Returns
        -------
        GAPA
            This GAPA, now fitted.

        Raises
        ------
        InputError
            When a key is missing, a value is of the wrong kind, or ``"sites"`` holds no
            :class:`gapa.gp.site.GPSite`.
        """
        try:
            sites = dict(state["sites"])
            shape = state["input_shape"]
            factor = float(state["lengthscale_factor"])
            fit_inputs = int(state.get("fit_inputs", 0))
            ids = state.get("input_ids")
            if not (ids is None or isinstance(ids, bool)):
                raise ValueError(f"input_ids must be True, False or None, got {ids!r}")
            training_ok = frozenset(state.get("training_ok", ()))
            calibration, class_calibration = state["calibration"], state["class_calibration"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not a GAPA state dict ({type(exc).__name__}: {exc})") from exc
        if not sites or not all(isinstance(site, GPSite) for site in sites.values()):
            raise InputError("a GAPA state dict needs at least one fitted GPSite in 'sites'")
        fingerprint = state.get("model") or model_fingerprint(self.model)
        self._sites, self._fingerprint = sites, dict(fingerprint)
        self._stamp = weights_stamp(self.model)
        self._input_shape = tuple(shape) if shape is not None else None
        self._input_ids = ids
        self._fit_inputs, self._training_ok, self._factor = fit_inputs, training_ok, factor
        self._calibration, self._class_calibration = calibration, class_calibration
        return self

    def _require_fitted(self, what: str) -> None:
        if not self._sites:
            raise NotFittedError(
                f"cannot {what}: this GAPA is not fitted; call gm.fit(train_inputs) first"
            )

    # --- fit ------------------------------------------------------------------------------------

    def fit(
        self, data=None, *, batch_size: int | None = None, progress: bool = False,
        store: str | os.PathLike | ActivationStore | None = None, store_dtype: str = "float32",
        memory_budget: int | str | None = None, distributed: bool | None = None,
    ) -> GAPA:
        """Cache the pre-activations of every GAPA call site over ``data`` and build the GPs.

        The model must be deterministic (eval mode); a model whose forward pass is random or
        changes its buffers is refused. Only the first batch runs whole: every later one stops
        once it has passed the GAPA call sites the first reached (no logits are computed). A fit
        that fails leaves the GAPA as it was; a fit that succeeds drops the calibrations and sets
        the lengthscale factor to 1.

        Parameters
        ----------
        data : torch.Tensor or Dataset or DataLoader or None, default None
            The training inputs: a Tensor, a TensorDataset, or a DataLoader (any iterable)
            yielding inputs, ``(inputs, targets)`` tuples (targets are never used) or named
            inputs (dicts, ``BatchEncoding``s; their ``attention_mask`` leaves padding out of
            the cache). ``None`` refits from a finished ``store``.
        batch_size : int or None, default None
            Rows per forward pass for a Tensor or a Dataset (a DataLoader keeps its batches);
            by default :data:`BATCH_SIZE`, or at most :data:`FIT_TOKENS` tokens per pass for a
            tensor of token ids (:func:`fit_batch_size`).
        progress : bool, default False
            Show tqdm bars for the capture and the GP building (the ``gapa-bench`` commands
            show them).
        store : str or os.PathLike or ActivationStore or None, default None
            A directory (or :class:`gapa.capture.store.ActivationStore`) to stream the cache to
            instead of memory. The GPs are then built from it in bounded memory (sampled
            statistics, k-means on a sample, streamed cluster counts). An interrupted capture
            resumes at its first unfinished shard when called again with the same store and
            data order.
        store_dtype : {"float32", "float16"}, default "float32"
            The dtype of the store's cache.
        memory_budget : int or str or None, default None
            Bytes, or a string such as ``"4GiB"``: refuse before anything is cached when
            :meth:`plan` expects the fit to need more resident memory.
        distributed : bool or None, default None
            Fit across the ranks of the initialised ``torch.distributed`` process group
            (:mod:`gapa.capture.distributed`): ``data`` is this rank's part of the training set
            (a ``DistributedSampler``), ``store`` a directory every rank sees, and every rank
            ends with the same fitted state, that of one process fitted on rank 0's inputs,
            then rank 1's, ... Every rank must call ``fit``. ``None`` (default): so when a
            process group of more than one process is initialised; ``False``: this process
            alone on its ``data``, as outside a process group.

        Returns
        -------
        GAPA
            This GAPA, fitted.

        Raises
        ------
        InputError
            Inputs that are not tensors of the model's dtype and device or change shape; no
            ``data`` and no finished store; ``memory_budget`` without ``data``, or with data of
            unknown size.
        EmptyDataError
            When ``data`` yields no rows.
        NonFiniteError
            NaN or Inf in the inputs or in the cached pre-activations.
        ModelModeError
            When the model, in training mode, is random or changes its buffers.
        LayerError
            When no GAPA layer runs in ``model.forward``.
        ConfigurationError
            Options the cache cannot satisfy, e.g. ``k`` above a conditioning set's rows.
        CacheTooLargeError
            ``conditioning="exact"`` on too many rows.
        MissingDependencyError
            A faiss search back end without faiss installed.
        MemoryBudgetError
            When the plan exceeds ``memory_budget``.
        StateFileError
            A store of another model, layer set or data order
            (:class:`gapa.errors.StoreMismatchError`), or a corrupt or locked store.
        DistributedError
            Across a process group: another rank failed (the failing rank raises its own
            error), the ranks could not communicate, or they fitted other weights or the same
            inputs.
        """
        # Everything is built aside and installed at the end: a fit that fails leaves the
        # GAPA exactly as it was (an earlier fit keeps working and saving).
        group = process_group(distributed)
        if group is not None and store is None:
            raise ConfigurationError(
                f"a fit across the {group[1]} processes of a torch.distributed process group "
                "needs store=DIR, a directory every rank sees (each rank caches its own part "
                "of the data there); to fit this process alone on its own data, pass "
                "distributed=False")
        batch_size = fit_batch_size(data, batch_size)
        if memory_budget is not None:
            if data is None:
                raise InputError("memory_budget needs the training data to plan the fit")
            n_train, example = size_and_example(data, batch_size)
            self.plan(n_train, example, on_disk=store is not None,
                      store_dtype=store_dtype).check(memory_budget)
        fingerprint = model_fingerprint(self.model)  # the weights the cache describes
        if store is None:
            if data is None:
                raise InputError("fit needs training inputs (or a finished store=...)")
            cache: dict[str, list[torch.Tensor]] = {}
            batches, seen = self._training_batches(data, batch_size, progress)
            n_train = known_size(data) if memory_budget is None else None  # else planned above
            with torch.no_grad(), self._capture(cache) as run:
                for i, batch in enumerate(batches):
                    run(batch)
                    if i == 0 and n_train is not None:
                        self._refuse_beyond_memory(n_train, cache, len(batch))
            sources = {key: torch.cat(cache.pop(key)) for key in list(cache)}
            sites = self._build_sites(sources, progress)
        elif group is not None:
            sites, seen = self._fit_across_ranks(data, store, store_dtype, batch_size, progress,
                                                 fingerprint, *group)
        elif data is None and _ranks_only(store):
            sites, seen = self._refit_from_ranks(Path(getattr(store, "path", store)),
                                                 fingerprint, progress)
        else:
            if not isinstance(store, ActivationStore):
                store = ActivationStore(store, store_dtype)
            try:
                seen = self._capture_to_store(data, store, batch_size, progress, fingerprint)
                device = model_device(self.model)
                sites = self._build_sites({key: store.rows(key, device) for key in store.keys},
                                          progress)
            finally:
                store.close()
        self._sites = sites
        self._input_shape, self._input_ids, self._fit_inputs = seen.shape, seen.ids, seen.inputs
        self._training_ok = seen.training
        self._fingerprint, self._stamp = fingerprint, weights_stamp(self.model)
        self._calibration = None
        self._class_calibration = None
        self._factor = 1.0  # of the fitted lengthscales; calibrate() may change it
        return self

    def _refuse_beyond_memory(self, n_train: int, cache: dict, first: int) -> None:
        """Refuse a fit whose plan, from the first batch's cache, exceeds the machine's memory.

        Without a ``memory_budget`` the budget is the device's whole memory: a fit beyond it
        would be killed by the system (or swap for hours) rather than fail with the numbers.
        """
        chunk = next(iter(cache.values()), [None])[0]
        limit = None if chunk is None else machine_memory(chunk.device)
        if limit is None:
            return
        sites = {key: (chunks[0].shape[1], max(1, round(sum(map(len, chunks)) / first)))
                 for key, chunks in cache.items()}
        plan = plan_fit(n_train, sites, self.config,
                        compute_dtype=str(chunk.dtype).removeprefix("torch."))
        plan.check(limit, what=f"the {chunk.device.type} memory of this machine")

    def _never_called(self) -> LayerError:
        which = (f"the default GAPA layer {self.layers[0]!r} (the last elementwise activation "
                 "module in model.named_modules())" if self._auto_layer
                 else f"the GAPA layers {self.layers}")
        return LayerError(f"{which} never ran in model.forward; pass layers=[...] naming "
                          "activation modules the forward pass calls")

    def _build_sites(self, sources: dict, progress: bool) -> dict[str, GPSite]:
        if not sources:
            raise self._never_called()
        unused = [key for key in self._overrides if key not in self.layers and key not in sources]
        if unused:  # a call-site key ("act#1") of a call the forward pass never made
            raise LayerError(
                f"hyperparameters given for the call sites {unused}, which the forward pass "
                f"never reached; its call sites are {list(sources)} (a layer's first call is its "
                "name, the next ones name#1, name#2, ...)")
        sites = {}
        for key, rows in tqdm(sources.items(), desc="gapa: building GPs", disable=not progress,
                              leave=False):
            layer = key.split("#")[0]
            overrides = {**self._overrides.get(layer, {}), **self._overrides.get(key, {})}
            module = self.model.get_submodule(layer)
            sites[key] = GPSite.fit(key, rows, module, self.config, overrides)
        return sites

    def plan(self, n_train: int, example: torch.Tensor | None = None, *, on_disk: bool = False,
             store_dtype: str = "float32") -> Plan:
        """Return the expected cost of fitting on ``n_train`` inputs, before anything is cached.

        ``print(gm.plan(...))`` shows a table; see :mod:`gapa.plan`.

        Parameters
        ----------
        n_train : int
            Training inputs of the planned fit.
        example : torch.Tensor or None, default None
            A batch of a few training inputs; one forward pass on it shows every call site's
            width and queries per input. A fitted GAPA may omit it (its sites say the same),
            e.g. to plan a refit on more data.
        on_disk : bool, default False
            Plan a fit that streams the cache to a store (``fit(..., store=...)``).
        store_dtype : {"float32", "float16"}, default "float32"
            The dtype of that store.

        Returns
        -------
        Plan
            The expected resident memory and disk use, per call site and in total.

        Raises
        ------
        InputError
            Without ``example`` on an unfitted GAPA, or an ``example`` that is not a tensor of
            the model's dtype and device.
        LayerError
            When no GAPA layer runs on ``example``.
        ModelModeError
            When the model, in training mode, is random or changes its buffers.
        ConfigurationError
            Impossible arguments, e.g. ``k`` above a call site's conditioning rows.
        """
        if example is None:
            if not self._sites or not self._fit_inputs:
                raise InputError("plan needs an example batch of training inputs (or a fitted "
                                 "GAPA, whose call sites give the widths)")
            sites = {key: (site.width, site.cache_size // self._fit_inputs)
                     for key, site in self._sites.items()}
            dtype = next(iter(self._sites.values())).rows.dtype
        else:
            example = Batch(example)
            self._check_input(example, shape=None)  # a refit may take inputs of another shape
            seen: dict[str, list[torch.Tensor]] = {}
            with torch.no_grad():
                check_deterministic(self.model, example)
                with self._capture(seen) as run:
                    run(example)
            if not seen:
                raise self._never_called()
            sites = {key: (chunks[0].shape[1], sum(len(c) for c in chunks) // len(example))
                     for key, chunks in seen.items()}
            dtype = example.main.dtype if example.main.is_floating_point() else torch.float32
        return plan_fit(n_train, sites, self.config, on_disk=on_disk, store_dtype=store_dtype,
                        compute_dtype=str(dtype).removeprefix("torch."))

    def _training_batches(self, data, batch_size: int,
                          progress: bool) -> tuple[Iterator[Batch], Seen]:
        """Return the checked input batches of ``data`` and what they showed.

        Each batch is checked (finite, one shape, the model's dtype and device); what they
        showed is filled in as they are consumed. EmptyDataError when there are none. The first
        batch is read and the model checked for determinism now, before the caller starts
        capturing activations.
        """
        batches = iter(tqdm(iterate_inputs(data, batch_size), desc="gapa: caching activations",
                            disable=not progress, leave=False))
        first = next(batches, None)
        first = None if first is None else Batch(first)
        if first is None or len(first) == 0:
            raise EmptyDataError("the training data yielded no rows; GAPA needs training inputs")
        seen = Seen(shape=tuple(first.main.shape[1:]), ids=is_token_ids(first.main))
        self._check_batch(first, 0, seen.shape, seen.ids)
        with torch.no_grad():
            seen.training = check_deterministic(self.model, first)

        def checked() -> Iterator[Batch]:
            yield first
            offset = len(first)
            for x in batches:
                x = Batch(x)
                self._check_batch(x, offset, seen.shape, seen.ids)
                offset += len(x)
                yield x
            seen.inputs = offset

        return checked(), seen

    def _check_batch(self, x: Batch, offset: int, shape: tuple[int, ...] | None,
                     ids: bool) -> None:
        self._check_input(x, shape, ids=ids)  # every batch of the kind of the first
        check_finite(x, "training inputs", offset)

    def _capture_to_store(self, data, store: ActivationStore, batch_size: int,
                          progress: bool, fingerprint: dict) -> Seen:
        """Stream the cache into ``store`` shard by shard.

        Shards it already holds are checked against the inputs' digest and skipped without
        running the model.
        """
        finished = store.open(self._store_signature(fingerprint))
        if data is None:
            if not store.complete:
                raise InputError(f"the activation store {store.path} is not complete; pass the "
                                 "training data to finish the capture")
            return Seen(shape=store.input_shape, ids=store.input_ids,
                         inputs=sum(shard["inputs"] for shard in store.manifest["shards"]))
        batches, seen = self._training_batches(data, batch_size, progress)
        cache: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad(), self._capture(cache) as run:
            stream_to_store(run, batches, cache, store, finished)
        store.finish(seen.shape, seen.ids)
        return seen

    def _store_signature(self, fingerprint: dict) -> dict:
        """Return what an activation store is of: the model, the layers, the queries."""
        return {"model": fingerprint, "layers": self.layers, "queries": self.queries.value}

    def _fit_across_ranks(self, data, store, store_dtype: str, batch_size: int, progress: bool,
                          fingerprint: dict, rank: int,
                          world: int) -> tuple[dict[str, GPSite], Seen]:
        """Capture this rank's ``data`` into its own store, then build from every rank's.

        See :mod:`gapa.capture.distributed`. Every rank reads all ranks' shards in rank order
        and builds the same sites; rank 0 then writes the rank list. The ranks agree after the
        capture and after the build, so a failure on one rank is raised on all.
        """
        if isinstance(store, ActivationStore):
            root, store_dtype, shard_rows = store.path, store.dtype, store.shard_rows
        else:
            root, shard_rows = Path(store), None
        names = [rank_store_name(r, world) for r in range(world)]

        def capture() -> dict:
            mine = ActivationStore(root / names[rank], store_dtype, shard_rows)
            try:
                seen = self._capture_to_store(data, mine, batch_size, progress, fingerprint)
            finally:
                mine.close()
            return {"inputs": seen.inputs, "shape": seen.shape, "ids": seen.ids,
                    "training": sorted(seen.training),
                    "model": fingerprint, "keys": mine.keys,
                    "digests": [shard["digest"] for shard in mine.manifest["shards"]]}

        reports = on_every_rank("in the capture", capture, rank, world)
        _check_reports(reports)
        sites: dict[str, GPSite] = {}

        def build() -> None:
            stores = rank_stores(root, names, self._store_signature(fingerprint))
            device = model_device(self.model)
            sites.update(self._build_sites(
                {key: joined_rows(stores, key, device) for key in reports[0]["keys"]}, progress))
            if rank == 0:
                write_ranks(root, world, [r["inputs"] for r in reports], reports[0]["shape"],
                            reports[0]["ids"])

        on_every_rank("in building the GPs", build, rank, world)
        return sites, Seen(shape=reports[0]["shape"], inputs=sum(r["inputs"] for r in reports),
                           training=frozenset(reports[0]["training"]), ids=reports[0]["ids"])

    def _refit_from_ranks(self, root: Path, fingerprint: dict,
                          progress: bool) -> tuple[dict[str, GPSite], Seen]:
        """Build the sites in this process alone from the finished rank stores under ``root``.

        The same sites as the fit across the process group that wrote them.
        """
        record = read_ranks(root)
        stores = rank_stores(root, record["stores"], self._store_signature(fingerprint))
        device = model_device(self.model)
        sites = self._build_sites({key: joined_rows(stores, key, device)
                                   for key in stores[0].keys}, progress)
        return sites, Seen(shape=tuple(record["input_shape"]), inputs=sum(record["inputs"]),
                           ids=record.get("input_ids"))  # read_ranks checked it

    @contextlib.contextmanager
    def _capture(self, cache: dict[str, list[torch.Tensor]]) -> Iterator[Callable[[Batch], None]]:
        """Install hooks that append every call site's query rows to ``cache``.

        Yields ``run(batch)``, which runs the model on a batch and leaves its padded positions
        out of the cache. The first batch runs whole; every later one stops as soon as it has
        reached the call sites the first one reached (nothing after the last GAPA layer runs:
        no logits at fit).
        """
        state = _CaptureState()

        def record(key: str, z: torch.Tensor) -> None:
            if state.stopped:  # the model caught the stop and went on: nothing more is cached
                return
            with untracked():
                rows = self._as_queries(z.detach())
                rows = rows.reshape(-1, rows.shape[-1])
                if state.mask is not None:
                    rows = rows[self._real_positions(key, z, state.mask).reshape(-1)]
                cache.setdefault(key, []).append(rows.clone())
            if state.sites is None:
                state.first.add(key)
            elif state.remaining is not None:
                state.remaining.discard(key)
                if not state.remaining:
                    state.stopped = True
                    raise _StopForward

        def run(batch: Batch) -> None:
            state.mask = batch.mask
            try:
                if state.sites is None:
                    batch.run(self.model)
                    state.sites = state.first
                else:
                    state.remaining, state.stopped = set(state.sites), False
                    with _stopping():
                        batch.run(self.model)
            finally:
                state.mask, state.remaining, state.stopped = None, None, False

        with call_sites(self.model, self.layers, record):
            yield run

    def _real_positions(self, key: str, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return ``mask`` as booleans that broadcast over the activation ``z`` at ``key``.

        Raises
        ------
        InputError
            ``z`` is not laid out (batch, length, units) like the mask, or queries are whole
            inputs (a padded position cannot be left out of a whole-input query).
        """
        if self.queries is Queries.PER_INPUT or z.dim() != 3 or z.shape[:2] != mask.shape:
            raise InputError(
                f"attention_mask of shape {tuple(mask.shape)} cannot mark the positions of the "
                f"activation at {key!r} of shape {tuple(z.shape)} with queries="
                f"{self.queries.value!r}: masking needs per-position queries on (batch, length, "
                "units) activations")
        return real_positions(mask, z)

    # --- predict ----------------------------------------------------------------------------------

    def __call__(self, x=None, /, **named) -> Moments:
        """Return the mean (the frozen network's output, bit for bit) and epistemic variance.

        Safe to call from several threads at once on one fitted GAPA (each call tracks only its
        own thread's forward pass); not while the same object is being fitted or calibrated.

        Parameters
        ----------
        x : torch.Tensor or Mapping
            Inputs shaped like the training inputs, in the model's dtype and on its device; or
            named inputs for ``model(**x)`` (a dict, a tokenizer's ``BatchEncoding``), whose
            ``attention_mask`` gives padded positions no GP variance.
        **named : torch.Tensor
            The named inputs as keyword arguments instead: ``gm(**batch)``.

        Returns
        -------
        Moments
            ``mean`` and ``var``, each shaped like the model's output.

        Raises
        ------
        NotFittedError
            Before a fit.
        InputError
            Inputs of another shape, dtype or device than the fit's.
        NonFiniteError
            NaN or Inf in ``x``, or a variance that is not finite (never returned): the
            message names the first module, or call site, where it appeared.
        ModelModeError
            When a module was put in training mode after the fit.
        ModelChangedError
            When the model's weights changed since the fit.
        LayerError
            When a GAPA layer is called more often than during the fit.
        UnsupportedOperationError
            When an operation without a variance rule receives an uncertain input, or no GAPA
            layer runs in the calling thread.
        """
        batch = _batch(x, named)
        if self.propagation == "jacobian":
            return self._jacobian_moments(batch, *self._jacobian_parts(batch))
        return self._diagonal(batch, culprit=lambda: self._diagonal_culprit(batch))[0]

    def _jacobian_moments(self, batch: Batch, mean: torch.Tensor, parts) -> Moments:
        """Return the moments of ``batch``'s Jacobian parts at the current lengthscales.

        Checked finite, with no variance at padding.
        """
        variance = self._variance_of(batch)
        return self._require_finite(_unpadded(combine_jacobian(mean, parts, variance), batch),
                                    lambda: _jacobian_culprit(parts, variance))

    def scored(self, x=None, /, **named) -> tuple[Moments, dict[str, torch.Tensor]]:
        """Return ``gm(x)`` and ``gm.layer_scores(x)`` from one forward pass.

        A language model wants both per token: the propagated logit variance and the GP
        variance at the GAPA layer itself (:meth:`layer_scores`); two calls would run the
        network twice. With ``propagation="jacobian"`` the scores take a second, shorter pass
        that stops after the last GAPA layer.

        Parameters
        ----------
        x : torch.Tensor or Mapping
            Inputs, as for ``gm(x)``; ``**named`` as for ``gm(**batch)``.

        Returns
        -------
        tuple of Moments and dict of str to torch.Tensor
            The moments, as :meth:`__call__` returns them, and the scores per call site, as
            :meth:`layer_scores` returns them.

        Raises
        ------
        GAPAError
            The errors of :meth:`__call__`.
        """
        batch = _batch(x, named)
        if self.propagation == "jacobian":
            return self(batch), self.layer_scores(batch)
        scores: dict[str, torch.Tensor] = {}
        out = self._diagonal(batch, culprit=lambda: self._diagonal_culprit(batch),
                             scores=scores)[0]
        return out, scores

    def _layer_score(self, key: str, variance: torch.Tensor) -> torch.Tensor:
        """One score per query: a site's GP variance over its prior amplitude, unit mean."""
        rows = self._as_queries(variance)
        return (rows / self._sites[key].hyperparameters.amplitude).mean(-1)

    def _diagonal(self, batch: Batch, carried=(), *, culprit: Callable[[], str],
                  scores: dict | None = None) -> tuple[Moments, VarianceTracker]:
        """Run the diagonal propagation of ``batch``.

        Returns its moments (checked finite, no variance at padding) and the tracker, whose
        variances a key-value cache carries into the next step; ``scores``, when given, gets
        each call site's :meth:`layer_scores`.
        """
        mean, tracker = self._forward(batch, carried=carried, scores=scores)
        return self._require_finite(_unpadded(_moments(tracker, mean), batch), culprit), tracker

    @staticmethod
    def _require_finite(out: Moments, culprit: Callable[[], str]) -> Moments:
        """Return ``out`` unless its variance holds NaN or Inf.

        Then raise a NonFiniteError naming where the first non-finite value appeared
        (``culprit()``, run only on this failing path).
        """
        if all_finite(out.var):
            return out
        bad = ~torch.isfinite(out.var)
        network = "" if bool(torch.isfinite(out.mean).all()) else (
            " The network's own output is not finite on these inputs either.")
        raise NonFiniteError(
            f"the epistemic variance is NaN or Inf at {int(bad.sum())} of {bad.numel()} output "
            f"values; it first appears {culprit()}.{network} GAPA never returns a non-finite "
            "variance: place the GAPA layers later in the network or compute in float64; "
            "gm.trace(x) shows every module's moments by the diagonal rule")

    def _diagonal_culprit(self, x: Batch) -> str:
        """Where the diagonal propagation of ``x`` first gives a non-finite variance."""
        for name, out in self.trace(x).items():
            if not bool(torch.isfinite(out.var).all()):
                module = self.model.get_submodule(name.split("#")[0]) if name else self.model
                return (f"at the output of module {name or '<model>'!r} ({type(module).__name__}) "
                        "in the diagonal propagation (propagation='jacobian' keeps the "
                        "correlations that a diagonal rule drops)")
        return "after the last module of the diagonal propagation"

    @contextlib.contextmanager
    def _predict_pass(self, x: Batch, grad: bool = False) -> Iterator[Batch]:
        """Check ``x`` and the model, then run the caller's forward pass.

        The pass runs outside inference mode (tensors keep the version counters the tracker
        relies on, and the Jacobian pass its graph) with autograd ``grad``; yields ``x`` (copies
        of inference tensors).
        """
        self._require_fitted("predict")
        self._check_input(x)
        check_finite(x, "inputs")
        self._check_model()
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            yield x.map(lambda t: t.clone() if t.is_inference() else t)

    def _check_model(self) -> None:
        """Refuse a model that is no longer the one fitted.

        That is a module put (back) in training mode (random outputs, running statistics
        updated), or weights written since the fit. Cheap: module flags and weight version
        counters; the weights' hash only when a counter moved.
        """
        new = [f"{name or '<model>'} ({type(m).__name__})"
               for name, m in self.model.named_modules()
               if m.training and name not in self._training_ok]
        if new:
            raise ModelModeError(
                f"the model has modules in training mode ({', '.join(new[-3:])}"
                f"{' and others' if len(new) > 3 else ''}) that were not at fit; their outputs may be "
                "random and their buffers would be updated: call model.eval() before predicting")
        stamp = weights_stamp(self.model)
        if stamp != self._stamp:
            if not same_model(model_fingerprint(self.model), self._fingerprint):
                raise ModelChangedError(
                    "the model's weights changed since GAPA was fitted, so the cached "
                    "activations no longer describe it and the variances would be wrong: refit "
                    "GAPA (gm.fit) or restore the weights it was fitted on")
            self._stamp = stamp

    def site_variance(self, key: str, z: torch.Tensor) -> torch.Tensor:
        """Return the GP variance GAPA adds at call site ``key`` for the pre-activation ``z``.

        Parameters
        ----------
        key : str
            A call site, as in :attr:`sites` (``"act"``, ``"act#1"``, ...).
        z : torch.Tensor
            The pre-activation, as the module receives it.

        Returns
        -------
        torch.Tensor
            The variance of the activation, shaped like ``z``.

        Raises
        ------
        NotFittedError
            Before a fit.
        LayerError
            When ``key`` was not seen during the fit.
        InputError
            When ``z`` has another width, dtype or device than the site's cache.
        """
        self._require_fitted("compute a site variance")
        site = self._sites.get(key)
        if site is None:
            raise LayerError(
                f"call site {key!r} was not seen during fit (the forward pass calls the "
                "module more often than on the training data); refit on representative data"
            )
        with untracked():
            return self._as_queries(site.variance(self._as_queries(z.detach())), like=z)

    def _variance_of(self, batch: Batch) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """Return :meth:`site_variance` for the pass over ``batch``: 0 at padded positions."""
        if batch.mask is None:
            return self.site_variance

        def variance(key: str, z: torch.Tensor) -> torch.Tensor:
            real = self._real_positions(key, z, batch.mask)
            return self.site_variance(key, z) * real.to(z.dtype)

        return variance

    def _as_queries(self, z: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """Return an activation as (..., units) rows of GP queries, per ``self.queries``.

        With ``like``, the inverse: such rows back in the shape of the activation ``like``.
        """
        if self.queries is Queries.PER_INPUT:
            return z.flatten(1) if like is None else z.reshape(like.shape)
        return units_last(z, inverse=like is not None)

    def _jacobian_parts(self, x: Batch):
        """Check ``x`` and the model, then run :func:`gapa.propagation.jacobian.jacobian_parts`.

        Grad is on and inference mode off for the forward and backward passes: callers may be
        in no_grad or inference mode.
        """
        with self._predict_pass(x, grad=True) as x:
            return jacobian_parts(self.model, self.layers, x)

    def _forward(
        self, x: Batch, outputs: list | None = None,
        carried: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
        scores: dict | None = None,
    ) -> tuple[torch.Tensor, VarianceTracker]:
        """Run one tracked forward pass; return the output and the tracker of every variance.

        ``carried``: tensors from an earlier pass (a key-value cache) and the variances they
        carry into this one. ``scores``, when given, gets each call site's layer score.
        """
        tracker = VarianceTracker()
        for t, var in carried:
            tracker.assign(t, var)
        pending: dict[str, torch.Tensor] = {}
        variance = self._variance_of(x)

        def on_call(key: str, z: torch.Tensor) -> None:
            with tracker.paused():
                pending[key] = variance(key, z)
                if scores is not None:
                    scores[key] = self._layer_score(key, pending[key])

        def on_output(key: str, out: torch.Tensor) -> None:
            with tracker.paused():
                tracker.assign(out, tracker.var_or_zero(out) + pending.pop(key))
                ran.append(key)

        ran: list[str] = []
        # tracking first: its hooks set a module's propagated variance before on_output adds
        # the GP variance to it
        with self._predict_pass(x) as x, tracking(self.model, tracker, outputs), \
                plain_fast_paths(self.model, self.layers,
                                 lambda args, kwargs: not tracker.any_uncertain(args, kwargs)), \
                call_sites(self.model, self.layers, on_call, on_output):
            mean = output_tensor(x.run(self.model))
        require_calls(ran, self.layers)
        return mean, tracker

    def trace(self, x: torch.Tensor) -> dict[str, Moments]:
        """Return the moments of every module's output at ``x``.

        Shows where variance enters and how each operation carries it, by the diagonal rule
        whatever :attr:`propagation` is; :func:`gapa.reference.monte_carlo_trace` gives the
        same entries by sampling, to find where the diagonal rule loses correlations.

        Parameters
        ----------
        x : torch.Tensor
            Inputs, as for ``gm(x)``.

        Returns
        -------
        dict of str to Moments
            The moments of every tensor output, in the order the calls finish; a module called
            again gets ``"name#1"``, ...; the whole model is ``""``.

        Raises
        ------
        GAPAError
            The errors of :meth:`__call__`.
        """
        outputs: list[tuple[str, torch.Tensor]] = []
        _, tracker = self._forward(Batch(x), outputs)
        traced: dict[str, Moments] = {}
        for name, out in outputs:
            if name == "":
                out = output_tensor(out)
            if isinstance(out, torch.Tensor):
                key = name
                i = 0
                while key in traced:
                    i += 1
                    key = f"{name}#{i}"
                traced[key] = _moments(tracker, out)
        return traced

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int):
        """Decode greedily, with the variance of every new token's logits.

        The network's top token at each step, one token per pass through transformers'
        key-value cache, which carries the variance of past keys and values as well as their
        means: each step's variance is the one the same token gets in one pass over the whole
        sequence (:mod:`gapa.generation`).

        Parameters
        ----------
        input_ids : torch.Tensor
            (batch, length) prompt ids.
        attention_mask : torch.Tensor, optional
            (batch, length), 0 at (left) padding.
        max_new_tokens : int
            How many tokens to generate.

        Returns
        -------
        gapa.generation.Generation
            ``tokens`` (batch, new) and ``logits``, their moments (batch, new, vocabulary).

        Raises
        ------
        ConfigurationError
            ``propagation="jacobian"`` (its graph cannot be carried through the cache), or
            ``max_new_tokens`` < 1.
        GAPAError
            The errors of :meth:`__call__`.
        """
        from .generation import decode

        if self.propagation != "diagonal":
            raise ConfigurationError(
                "generate carries variances through the key-value cache, which only "
                "propagation='diagonal' has; set gm.propagation = 'diagonal'")
        # a failing step is not traced again: that would run the mutated cache once more
        return decode(lambda batch, carried: self._diagonal(
            batch, carried, culprit=lambda: "in a generation step (gm.trace shows where)"),
            input_ids, attention_mask, max_new_tokens=max_new_tokens)

    def layer_scores(self, x=None, /, **named) -> dict[str, torch.Tensor]:
        """Return, per call site, how far each query lies from the training activations.

        The score is the GP variance at the GAPA layer itself, before any propagation, relative
        to the prior amplitude and averaged over the units: near 0 at the cached activations,
        1 far from all of them. It reads the input's position in the layer's activation space
        alone, whatever the rest of the network does with it (an out-of-distribution score for
        language models, where the propagated logit variance also reflects the head). The
        forward pass stops after the last GAPA layer.

        Parameters
        ----------
        x : torch.Tensor or Mapping
            Inputs, as for ``gm(x)`` (named inputs too); ``**named`` as for ``gm(**batch)``.

        Returns
        -------
        dict of str to torch.Tensor
            Per call site, one score per query: shaped (batch,) for an MLP layer or
            ``queries="per_input"``, (batch, length) for a sequence, (batch, height, width)
            for a feature map. Padded positions (``attention_mask`` 0) score 0.

        Raises
        ------
        GAPAError
            The errors of :meth:`__call__`.
        """
        batch = _batch(x, named)
        scores: dict[str, torch.Tensor] = {}
        remaining = set(self._sites)
        variance = self._variance_of(batch)  # 0 at padding

        def on_call(key: str, z: torch.Tensor) -> None:
            scores[key] = self._layer_score(key, variance(key, z))
            remaining.discard(key)
            if not remaining:
                raise _StopForward

        with self._predict_pass(batch) as checked, torch.no_grad(), \
                call_sites(self.model, self.layers, on_call), _stopping():
            checked.run(self.model)
        require_calls(list(scores), self.layers)
        return scores

    def pre_activations(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the pre-activation at every GAPA call site for inputs ``x``.

        Parameters
        ----------
        x : torch.Tensor
            Inputs shaped like the training inputs.

        Returns
        -------
        dict of str to torch.Tensor
            Per call site, the (rows, units) query rows, as the fit caches them.

        Raises
        ------
        NotFittedError
            Before a fit.
        InputError
            Inputs of another shape, dtype or device than the fit's.
        """
        self._require_fitted("read pre-activations")
        x = Batch(x)
        self._check_input(x)
        seen: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad(), self._capture(seen) as run:
            run(x)
        return {key: torch.cat(chunks) for key, chunks in seen.items()}

    def _check_input(self, x, shape: tuple[int, ...] | bool | None = True,
                     ids: bool | None = None) -> None:
        """Refuse inputs unlike the fitted ones or unlike the model's dtype and device.

        ``shape``: True for the fitted inputs' shape and kind (ids or values), a tuple, or None
        to skip the shape check; ``ids``: the kind to require with a tuple or None.
        """
        check_input(x, self.model, self._input_shape if shape is True else shape or None,
                    any_length=self.queries is Queries.PER_POSITION,
                    ids=self._input_ids if shape is True else ids)

    # --- calibrated predictives (regression, classification) ------------------------------------------------------------------

    def calibrate(
        self, x: torch.Tensor, y: torch.Tensor, *,
        lengthscale_factors: Sequence[float] | None = LENGTHSCALE_FACTORS,
    ) -> Calibration:
        """Fit the output noise and one global variance scale on validation data (regression).

        Minimises the validation Gaussian NLL of ``N(mean, scale * var + noise)``; the mean is
        never changed. With ``lengthscale_factors``, every call site's lengthscales are also
        multiplied by the factor with the best validation NLL (one pass over ``x`` per factor;
        no refit, since a common factor keeps the neighbours). A new factor drops the
        classification calibration.

        Parameters
        ----------
        x : torch.Tensor
            Validation inputs, all in one forward pass (per lengthscale factor).
        y : torch.Tensor
            Validation targets, shaped like the model's output on ``x``.
        lengthscale_factors : sequence of float or None, default LENGTHSCALE_FACTORS
            The factors to choose from; ``None`` keeps the lengthscale factor in force.

        Returns
        -------
        Calibration
            The fitted scale, noise and validation NLL, also kept as :attr:`calibration`.

        Raises
        ------
        NotFittedError
            Before a fit.
        ConfigurationError
            A lengthscale factor that is not a positive finite number.
        InputError
            Targets that are not a tensor shaped like the output, or residuals that are all zero.
        NonFiniteError
            NaN or Inf in the targets.
        GAPAError
            The errors of :meth:`__call__` on ``x``.
        """
        if not isinstance(y, torch.Tensor):
            raise InputError(f"targets must be a torch.Tensor shaped like the model output, got "
                             f"{type(y).__name__}")

        def fit(out: Moments) -> tuple[Calibration, float]:
            if y.shape != out.mean.shape:
                raise InputError(
                    f"targets of shape {tuple(y.shape)} do not match the model output "
                    f"{tuple(out.mean.shape)}"
                )
            cal = fit_scale_and_noise(out.mean, out.var, y)
            return cal, cal.nll

        result, factor = self._fit_on_validation(x, fit, lengthscale_factors, None)
        self._commit_factor(factor)
        self._calibration = result
        return result

    def calibrate_classifier(
        self, x, labels: torch.Tensor, *,
        lengthscale_factors: Sequence[float] | None = LENGTHSCALE_FACTORS,
        method: Method | str = Method.ARGMAX_PRESERVING, batch_size: int | None = BATCH_SIZE,
        next_token: bool = False, ignore_index: int = -100, class_dim: int = -1,
    ) -> VarianceScaleFit:
        """Fit one scale of the logit variance on validation NLL (classification).

        The classification counterpart of :meth:`calibrate`: the scale of ``p(mean, c * var)``
        under ``method`` (:func:`gapa.predictive.classification.fit_variance_scale`) and, with
        ``lengthscale_factors``, the lengthscale factor with the best validation NLL. The
        logits' mean is never changed; :meth:`classify` then uses the fitted scale. A new
        factor drops the regression calibration.

        Parameters
        ----------
        x : torch.Tensor or Mapping
            Validation inputs (named inputs too: their padded positions are not scored).
        labels : torch.Tensor
            Integer class indices, shaped like the logits without their class axis;
            ``ignore_index`` marks positions that are not scored.
        lengthscale_factors : sequence of float or None, default LENGTHSCALE_FACTORS
            The factors to choose from; ``None`` keeps the lengthscale factor in force.
        method : {"argmax_preserving", "probit"}, default "argmax_preserving"
            The predictive the scale is fitted for (:class:`gapa.predictive.classification.Method`).
        batch_size : int or None, default BATCH_SIZE
            Rows per forward pass; ``None`` runs all rows at once.
        next_token : bool, default False
            A causal language model: the logits at position ``t`` predict ``labels[:, t + 1]``
            (labels are the input ids, as transformers' models take them), so the last
            position has no target and the first label none of its own.
        ignore_index : int, default -100
            The label of positions left out (transformers' and PyTorch's convention).
        class_dim : int, default -1
            The logits' class axis: ``1`` for a segmentation network's ``(N, C, H, W)``, whose
            labels are ``(N, H, W)`` (every pixel is scored).

        Returns
        -------
        VarianceScaleFit
            The fitted scale, its NLL and the plain softmax's, also kept as
            :attr:`class_calibration`.

        Raises
        ------
        NotFittedError
            Before a fit.
        ConfigurationError
            A lengthscale factor that is not a positive finite number, or another ``method``.
        InputError
            Labels that are not integer class indices of the logits' batch shape.
        GAPAError
            The errors of :meth:`__call__` on ``x``.
        """
        batch = Batch(x)

        def fit(out: Moments) -> tuple[VarianceScaleFit, float]:
            mean, var, targets = scored_positions(out, labels, batch.mask, next_token=next_token,
                                                  ignore_index=ignore_index, class_dim=class_dim)
            scale = fit_variance_scale(mean, var, targets, method=method)
            return scale, scale.nll

        result, factor = self._fit_on_validation(batch, fit, lengthscale_factors, batch_size)
        self._commit_factor(factor)
        self._class_calibration = result
        return result

    def _commit_factor(self, factor: float) -> None:
        """Install the factor a calibration chose.

        The calibrations fitted at another factor (of either kind) no longer hold and are
        dropped.
        """
        if factor != self._factor:
            self._set_factor(factor)
            self._calibration = self._class_calibration = None

    def _fit_on_validation(self, x, fit, lengthscale_factors, batch_size):
        """Run ``fit(moments) -> (result, nll)`` at each lengthscale factor; return the best.

        Returns the best result and its factor (on ties the factor nearest 1; the factor in
        force without factors). The sites are left at the factor in force, whatever happens:
        the caller commits.
        """
        self._require_fitted("calibrate")
        if lengthscale_factors is not None:
            lengthscale_factors = parse_lengthscale_factors(lengthscale_factors, "lengthscale factors")
        best = None
        # nearest to the label-free rule's own lengthscale first: only a strictly better
        # validation NLL moves away from it (a flat NLL, e.g. a fitted scale of 0, keeps it)
        factors = sorted(lengthscale_factors, key=lambda f: abs(math.log(f))) \
            if lengthscale_factors else [None]
        batches = Batch(x).split(batch_size)
        with contextlib.ExitStack() as stack:
            if self.propagation == "jacobian" and len(factors) > 1:
                # the gradients do not depend on the lengthscale: one backward pass for all
                # factors
                parts = [(xb, self._jacobian_parts(xb)) for xb in batches]

                def moments() -> Moments:
                    return Moments.cat([self._jacobian_moments(xb, *p) for xb, p in parts])
            elif len(factors) > 1:
                # only the GP variance changes between factors: what runs before the first
                # GAPA layer is computed once per batch and replayed (capture.prefix)
                replay = stack.enter_context(replaying_prefix(self.model, self.layers))

                def moments() -> Moments:
                    return Moments.cat([replay(i, lambda xb=xb: self(xb))
                                        for i, xb in enumerate(batches)])
            else:
                def moments() -> Moments:
                    return Moments.cat([self(xb) for xb in batches])
            try:
                for factor in factors:
                    if factor is not None:
                        self._rescale_lengthscales(factor)
                    result, nll = fit(moments())
                    if best is None or nll < best[1]:
                        best = (result, nll, factor)
            finally:
                self._rescale_lengthscales(self._factor)
        result, _, factor = best
        return result, self._factor if factor is None else float(factor)

    def moments(self, x: torch.Tensor, batch_size: int | None = BATCH_SIZE) -> Moments:
        """Return ``gm(x)`` computed in batches of ``batch_size`` rows.

        Parameters
        ----------
        x : torch.Tensor
            Inputs, as for ``gm(x)``.
        batch_size : int or None, default BATCH_SIZE
            Rows per forward pass; ``None`` runs all rows at once.

        Returns
        -------
        Moments
            The moments of all rows, concatenated along the batch axis.

        Raises
        ------
        GAPAError
            The errors of :meth:`__call__`.
        """
        batches = Batch(x).split(batch_size)
        return self(batches[0]) if len(batches) == 1 else Moments.cat([self(b) for b in batches])

    def classify(
        self, x: torch.Tensor, *, method: Method | str | None = None,
        ood_score: OODScore | str = OODScore.ENTROPY, batch_size: int | None = BATCH_SIZE,
        class_dim: int = -1,
    ) -> ClassPrediction:
        """Return class probabilities and per-input uncertainty for inputs ``x``.

        Per input: class probabilities, the network's own predicted class (default method),
        predictive entropy, logit variances and an OOD score (higher = more OOD). Uses the
        scale and method fitted by :meth:`calibrate_classifier`, which it needs, as
        :meth:`predict` needs :meth:`calibrate`; ``gm(x)`` gives the raw logit moments.

        Parameters
        ----------
        x : torch.Tensor
            Inputs, as for ``gm(x)``.
        method : Method or str or None, default None
            Overrides the fitted method (:class:`gapa.predictive.classification.Method`).
        ood_score : OODScore or str, default "entropy"
            The quantity of ``ood_score`` (:class:`gapa.predictive.classification.OODScore`).
        batch_size : int or None, default BATCH_SIZE
            Rows per forward pass; ``None`` runs all rows at once.
        class_dim : int, default -1
            The logits' class axis: ``1`` for a segmentation network, whose scores then come
            as ``(N, H, W)`` maps (``probs`` keeps ``(N, C, H, W)``).

        Returns
        -------
        ClassPrediction
            Probabilities, predicted class, entropy, logit variances and OOD score.

        Raises
        ------
        NotFittedError
            Before a fit, or before :meth:`calibrate_classifier`.
        ConfigurationError
            An unknown ``method`` or ``ood_score``.
        GAPAError
            The errors of :meth:`__call__`, and those of
            :func:`gapa.predictive.classification.predict_classes` on the logit moments.
        """
        self._require_fitted("classify")
        fitted = self._class_calibration
        if fitted is None:
            raise NotFittedError(
                "classify needs a calibrated variance scale: call "
                "gm.calibrate_classifier(val_x, val_labels) first (or use gm(x) for the raw "
                "logit moments)")
        return predict_classes(self.moments(x, batch_size), method or fitted.method,
                               ood_score=ood_score, variance_scale=fitted.scale,
                               class_dim=class_dim)

    def _rescale_lengthscales(self, factor: float) -> None:
        for site in self._sites.values():
            site.rescale_lengthscale(factor)

    def predict(self, x: torch.Tensor, *,
                batch_size: int | None = BATCH_SIZE) -> torch.distributions.Normal:
        """Return the calibrated regression predictive ``N(mean, scale * var + noise)``.

        Needs :meth:`calibrate`; ``gm(x)`` gives the raw moments.

        Parameters
        ----------
        x : torch.Tensor
            Inputs, as for ``gm(x)``.
        batch_size : int or None, default BATCH_SIZE
            Rows per forward pass; ``None`` runs all rows at once.

        Returns
        -------
        torch.distributions.Normal
            Mean ``gm(x).mean`` and standard deviation ``sqrt(scale * var + noise)``.

        Raises
        ------
        NotFittedError
            Before a fit, or before :meth:`calibrate`.
        GAPAError
            The errors of :meth:`__call__`.
        """
        self._require_fitted("predict")
        if self._calibration is None:
            raise NotFittedError(
                "predict needs a calibrated output noise: call gm.calibrate(val_x, val_y) first "
                "(or use gm(x) for the raw moments)"
            )
        out = self.moments(x, batch_size)
        return torch.distributions.Normal(out.mean, self._calibration.predictive_std(out.var))


def _ranks_only(store) -> bool:
    """Return whether ``store`` is the directory of a distributed fit (rank stores only)."""
    path = Path(getattr(store, "path", store))
    return (path / RANKS).exists() and not (path / MANIFEST).exists()


def _check_reports(reports: list[dict]) -> None:
    """Refuse rank captures that cannot make one fit (the same check on every rank).

    Raises
    ------
    DistributedError
        Other weights, call sites or modules in training mode than rank 0's, or two ranks that
        captured the same inputs.
    InputError
        Inputs of another shape than rank 0's.
    """
    first = reports[0]
    for rank, report in enumerate(reports[1:], start=1):
        if report["shape"] != first["shape"] or report["ids"] != first["ids"]:
            kind = {True: " (integer ids)", False: " (values)", None: ""}
            raise InputError(f"rank {rank}'s inputs are of shape {report['shape']}"
                             f"{kind[report['ids']]}, rank 0's of {first['shape']}"
                             f"{kind[first['ids']]}: every rank must fit on the same kind of input")
        for what, key in (("weights", "model"), ("GAPA call sites", "keys"),
                          ("modules in training mode", "training")):
            if report[key] != first[key]:
                raise DistributedError(f"rank {rank} captured with other {what} than rank 0: "
                                       "every rank must fit the same network")
    seen: dict[tuple, int] = {}
    for rank, report in enumerate(reports):
        other = seen.setdefault(tuple(report["digests"]), rank)
        if other != rank:
            raise DistributedError(
                f"ranks {other} and {rank} captured the same inputs: each rank must fit on its "
                "own part of the data (a DataLoader with a DistributedSampler), or pass "
                "distributed=False to fit each process alone")


class _StopForward(Exception):  # a signal, not an error
    """Raised by the capture's hook once a batch has reached every call site it needs."""


@contextlib.contextmanager
def _stopping() -> Iterator[None]:
    """Swallow the capture's stop, also when the model re-raised it as another exception.

    That is any error whose chain (``raise RuntimeError(...) from e``) holds a
    :class:`_StopForward`.
    """
    try:
        yield
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, _StopForward):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise


@dataclass
class _CaptureState:
    """What :meth:`GAPA._capture` knows about the pass in progress."""

    first: set = field(default_factory=set)  # the call sites the first batch reached
    sites: set | None = None  # the call sites a batch must reach, once the first has run
    remaining: set | None = None  # those this batch has not reached yet (None: no stopping)
    stopped: bool = False
    mask: torch.Tensor | None = None  # the batch's attention mask


def _batch(x, named: dict) -> Batch:
    """Return the inputs of ``gm(x)`` or ``gm(**named)`` as one :class:`Batch`."""
    if named and x is not None:
        raise InputError("give the inputs as one argument or as named arguments, not both")
    if not named and x is None:
        raise InputError("no inputs: call gm(x) with a tensor, or gm(**batch) with named inputs")
    return Batch(named if named else x)


def _unpadded(out: Moments, batch: Batch) -> Moments:
    """Return ``out`` with no variance at the padded positions of ``batch``.

    Only for an output laid out (batch, length, ...) like the mask: a padded position is not a
    prediction (its variance comes only from the real positions it attends to).
    """
    mask = batch.mask
    if mask is None or out.var.dim() < 2 or out.var.shape[:2] != mask.shape:
        return out
    return Moments(out.mean, torch.where(real_positions(mask, out.var), out.var,
                                         torch.zeros((), dtype=out.var.dtype,
                                                     device=out.var.device)))


def _jacobian_culprit(parts, site_variance) -> str:
    """Say where the Jacobian propagation first gives a non-finite value.

    That is a site's GP variance or its squared gradients.
    """
    for key, z, squares in parts:
        if not bool(torch.isfinite(site_variance(key, z)).all()):
            return f"in the GP variance of call site {key!r}"
        if any(sq is not None and not bool(torch.isfinite(sq).all()) for sq in squares):
            return f"in the squared gradients of the output with respect to call site {key!r}"
    return "in the sum over call sites of the Jacobian propagation"


def _moments(tracker: VarianceTracker, out: torch.Tensor) -> Moments:
    var = tracker.var(out)
    return Moments(out, torch.zeros_like(out) if var is None else var)


