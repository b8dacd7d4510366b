"""Every error case of the public API: the typed error, the builtin it also is, and the key words
of its message (what went wrong, and what to do about it)."""

from __future__ import annotations

import inspect
import re
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gapa
import gapa.errors
import gapa.gp.conditioning

# --- models ------------------------------------------------------------------------------------


def net(width: int = 8, head: nn.Module | None = None, seed: int = 0) -> nn.Sequential:
    """fc1 -> act (Tanh, the GAPA layer) -> [head] -> fc2, with readable module names."""
    torch.manual_seed(seed)
    mods: list[tuple[str, nn.Module]] = [("fc1", nn.Linear(3, width)), ("act", nn.Tanh())]
    if head is not None:
        mods.append(("head", head))
    mods.append(("fc2", nn.Linear(width, 2)))
    return nn.Sequential(OrderedDict(mods)).eval()


class Poison(nn.Module):
    """Turns the rows whose first unit exceeds 0.5 into NaN (``h * inf * 0``), others unchanged."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        bad = h[:, :1] > 0.5
        inf = torch.where(bad, float("inf"), 1.0)
        zero = torch.where(bad, 0.0, 1.0)
        return h * inf * zero


class SortHead(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sort(h, dim=-1).values


class CumsumHead(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(h, dim=-1)


@pytest.fixture
def x20(gen) -> torch.Tensor:
    return torch.randn(20, 3, generator=gen)


@pytest.fixture
def fitted(x20) -> gapa.GAPA:
    return gapa.GAPA(net(), m=None).fit(x20, progress=False)


def _fit(model: nn.Module, x: torch.Tensor, **kw) -> gapa.GAPA:
    kw.setdefault("m", None)
    return gapa.GAPA(model, **kw).fit(x, progress=False)


# --- the hierarchy -----------------------------------------------------------------------------


BUILTIN = {
    gapa.NotFittedError: RuntimeError,
    gapa.LayerError: ValueError,
    gapa.InputError: ValueError,
    gapa.NonFiniteError: ValueError,
    gapa.errors.EmptyDataError: ValueError,
    gapa.ConfigurationError: ValueError,
    gapa.errors.CacheTooLargeError: MemoryError,
    gapa.UnsupportedOperationError: NotImplementedError,
    gapa.errors.NumericalError: RuntimeError,
    gapa.errors.MissingDependencyError: ImportError,
    gapa.ModelModeError: RuntimeError,
    gapa.StateFileError: OSError,
    gapa.errors.CorruptStateError: OSError,
    gapa.errors.FormatVersionError: OSError,
    gapa.errors.ModelMismatchError: OSError,
    gapa.errors.ArchitectureMismatchError: OSError,
    gapa.errors.WeightsMismatchError: OSError,
    gapa.errors.StoreMismatchError: OSError,
    gapa.errors.CorruptStoreError: OSError,
    gapa.errors.StoreLockedError: OSError,
    gapa.ModelChangedError: RuntimeError,
    gapa.errors.MemoryBudgetError: MemoryError,
    gapa.errors.DistributedError: RuntimeError,
}


def test_every_error_class_is_listed_and_the_most_used_are_at_the_top_level():
    defined = {
        obj for _, obj in inspect.getmembers(gapa.errors, inspect.isclass)
        if issubclass(obj, Exception) and obj.__module__ == gapa.errors.__name__
    }
    assert defined - {gapa.GAPAError} == set(BUILTIN)
    top = {obj for name, obj in vars(gapa).items() if inspect.isclass(obj)
           and issubclass(obj, Exception)}
    assert top < defined and gapa.GAPAError in top and len(top) <= 10


def test_harness_errors_live_in_the_harness():
    from gapa_bench.errors import DataError, NotApplicableError

    assert not hasattr(gapa.errors, "DataError") and not hasattr(gapa, "NotApplicableError")
    assert issubclass(DataError, gapa.GAPAError) and issubclass(DataError, ValueError)
    assert issubclass(NotApplicableError, gapa.ConfigurationError)


@pytest.mark.parametrize("cls", list(BUILTIN), ids=lambda c: c.__name__)
def test_error_subclasses_gapa_error_and_its_builtin(cls):
    assert issubclass(cls, gapa.GAPAError)
    assert issubclass(cls, BUILTIN[cls])
    err = cls("message")
    assert isinstance(err, gapa.GAPAError) and isinstance(err, BUILTIN[cls])


# --- not fitted --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "use",
    [
        lambda gm, x: gm(x),
        lambda gm, x: gm.sites,
        lambda gm, x: gm.predict(x),
        lambda gm, x: gm.calibrate(x, torch.zeros(x.shape[0], 2)),
    ],
    ids=["call", "sites", "predict", "calibrate"],
)
def test_use_before_fit_raises_not_fitted(x20, use):
    gm = gapa.GAPA(net(), m=None)
    with pytest.raises(gapa.NotFittedError, match=r"not fitted.*gm\.fit\(") as info:
        use(gm, x20)
    assert isinstance(info.value, RuntimeError)


def test_predict_before_calibrate_names_calibrate(fitted, x20):
    with pytest.raises(gapa.NotFittedError, match=r"gm\.calibrate\(") as info:
        fitted.predict(x20)
    assert isinstance(info.value, RuntimeError)


# --- layers ------------------------------------------------------------------------------------


def test_unknown_layer_suggests_close_names():
    with pytest.raises(gapa.LayerError, match=r"no module named 'actt'.*did you mean.*'act'") as info:
        gapa.GAPA(net(), layers=["actt"])
    assert isinstance(info.value, ValueError)


def test_linear_layer_is_not_an_activation():
    with pytest.raises(gapa.LayerError, match=r"'fc1' is a Linear, not an elementwise activation") as info:
        gapa.GAPA(net(), layers="fc1")
    assert isinstance(info.value, ValueError)


def test_empty_layer_list():
    with pytest.raises(gapa.LayerError, match="layers is empty") as info:
        gapa.GAPA(net(), layers=[])
    assert isinstance(info.value, ValueError)


def test_model_without_activation_and_default_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(gapa.LayerError, match=r"no elementwise activation.*layers=") as info:
        gapa.GAPA(model)
    assert isinstance(info.value, ValueError)


class UnusedLastActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.spare = nn.Linear(3, 4), nn.Tanh(), nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


@pytest.mark.parametrize("layers", [None, ["spare"]])
def test_a_layer_the_forward_never_calls_is_named_and_the_default_says_how_it_was_chosen(
        layers):
    gm = gapa.GAPA(UnusedLastActivation(), layers=layers)
    for call in (lambda: gm.plan(100, torch.randn(4, 3)), lambda: gm.fit(torch.randn(20, 3))):
        with pytest.raises(gapa.LayerError, match=r"'spare'.* never ran in model.forward") as info:
            call()
        assert ("default" in str(info.value)) == (layers is None)
    assert not gm.is_fitted


# --- inputs at predict -------------------------------------------------------------------------


def test_wrong_input_width(fitted):
    with pytest.raises(gapa.InputError, match=re.escape("(5, 4)") + r".*" + re.escape("(batch, 3)")) as info:
        fitted(torch.randn(5, 4))
    assert isinstance(info.value, ValueError)


def test_wrong_input_rank(fitted):
    with pytest.raises(gapa.InputError, match=re.escape("(5, 1, 3)") + r".*" + re.escape("(batch, 3)")) as info:
        fitted(torch.randn(5, 1, 3))
    assert isinstance(info.value, ValueError)


def test_wrong_input_dtype(fitted):
    with pytest.raises(gapa.InputError, match=r"torch\.float64.*torch\.float32") as info:
        fitted(torch.randn(5, 3, dtype=torch.float64))
    assert isinstance(info.value, ValueError)


def test_integer_inputs_after_a_fit_on_values_and_the_reverse(fitted, tmp_path):
    """The kind of the fit's inputs is kept (and saved): integers where floats were fitted
    are refused by name, not by torch inside the model."""
    with pytest.raises(gapa.InputError, match=r"torch\.int64 \(integer ids\).*floating values"):
        fitted(torch.randint(0, 5, (4, 3)))
    torch.manual_seed(0)
    embedded = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 8), nn.Tanh(),
                             nn.Linear(8, 2))
    ids = gapa.GAPA(embedded, m=None).fit(torch.randint(0, 10, (30, 3)), progress=False)
    loaded = gapa.GAPA.load(ids.save(tmp_path / "ids.gapa"), embedded)
    for gm in (ids, loaded):
        with pytest.raises(gapa.InputError, match=r"torch\.float32 \(floating values\).*integer"):
            gm(torch.randn(4, 3))
        assert gm(torch.randint(0, 10, (4, 3))).var.shape == (4, 2)


def test_calibrate_with_targets_of_the_wrong_shape(fitted, x20):
    with pytest.raises(gapa.InputError, match=re.escape("(20,)") + r".*" + re.escape("(20, 2)")) as info:
        fitted.calibrate(x20, torch.zeros(20))
    assert isinstance(info.value, ValueError)


# --- non-finite values -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_training_inputs(x20, bad):
    x = x20.clone()
    x[3, 0] = bad
    x[7, 2] = bad
    with pytest.raises(gapa.NonFiniteError, match=r"training inputs contain 2 NaN/Inf.*\[3, 7\]") as info:
        gapa.GAPA(net(), m=None).fit(x, progress=False)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [float("nan"), -float("inf")])
def test_non_finite_predict_inputs(fitted, x20, bad):
    x = x20[:5].clone()
    x[1, 1] = bad
    with pytest.raises(gapa.NonFiniteError, match=r"inputs contain 1 NaN/Inf.*\[1\]") as info:
        fitted(x)
    assert isinstance(info.value, ValueError)


def test_non_finite_cached_activations_name_the_layer(x20):
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(3, 8), poison=Poison(), act=nn.Tanh(), fc2=nn.Linear(8, 2))
    ).eval()
    with torch.no_grad():
        n_bad = int((model.fc1(x20)[:, 0] > 0.5).sum())
    assert 0 < n_bad < len(x20)  # only some rows are poisoned; the inputs themselves are finite
    with pytest.raises(gapa.NonFiniteError, match=r"pre-activations at 'act' contain \d+ NaN") as info:
        gapa.GAPA(model, layers="act", m=None).fit(x20, progress=False)
    assert isinstance(info.value, ValueError)


# --- configuration -----------------------------------------------------------------------------


def test_k_larger_than_the_cache(x20):
    with pytest.raises(
        gapa.ConfigurationError,
        match=r"k=50 neighbours exceed the 20 conditioning rows of site 'act' \(m=None, 20 inputs"
    ) as info:  # the plan made from the first batch refuses it
        _fit(net(), x20, k=50)
    assert isinstance(info.value, ValueError)


def test_k_larger_than_m(gen):
    x = torch.randn(100, 3, generator=gen)
    with pytest.raises(
        gapa.ConfigurationError,
        match=r"k=50 neighbours exceed the 30 conditioning rows of site 'act' \(m=30, 100 inputs"
    ) as info:
        _fit(net(), x, k=50, m=30, inducing="random")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, r"k must be a positive integer, got 0"),
        ({"m": 0}, r"m must be a positive integer or None, got 0"),
        ({"conditioning": "global"}, r"unknown conditioning 'global'; use one of 'local', 'exact'"),
        ({"search": "annoy"}, r"unknown search 'annoy'; use one of 'exact', 'torch', 'faiss'"),
        ({"inducing": "grid"}, r"unknown inducing 'grid'; use one of 'kmeans', 'random'"),
    ],
    ids=["k=0", "m=0", "conditioning", "search", "inducing"],
)
def test_bad_options(kwargs, message):
    with pytest.raises(gapa.ConfigurationError, match=message) as info:
        gapa.GAPA(net(), **kwargs)
    assert isinstance(info.value, ValueError)


# --- empty data --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        torch.empty(0, 3),
        TensorDataset(torch.empty(0, 3)),
        DataLoader(TensorDataset(torch.empty(0, 3), torch.empty(0, 2)), batch_size=4),
    ],
    ids=["tensor", "tensor_dataset", "data_loader"],
)
def test_empty_training_set(data):
    with pytest.raises(gapa.errors.EmptyDataError, match="no rows") as info:
        gapa.GAPA(net(), m=None).fit(data, progress=False)
    assert isinstance(info.value, ValueError)


# --- exact conditioning too large ---------------------------------------------------------------


def test_exact_conditioning_above_the_limit(monkeypatch, x20):
    monkeypatch.setattr(gapa.gp.conditioning, "EXACT_MAX_ROWS", 10)
    with pytest.raises(
        gapa.errors.CacheTooLargeError, match=r"20 rows.*limit is 10 rows.*conditioning='local'"
    ) as info:
        _fit(net(), x20, conditioning="exact")
    assert isinstance(info.value, MemoryError)


# --- hyperparameter overrides ------------------------------------------------------------------


def test_override_for_an_unknown_layer():
    with pytest.raises(gapa.LayerError, match=r"\['fc1'\], which are not GAPA layers") as info:
        gapa.GAPA(net(), hyperparameters={"fc1": {"lengthscale": 1.0}})
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"scale": 1.0}, r"unknown hyperparameter\(s\) \['scale'\]; allowed: lengthscale, amplitude, noise_ratio"),
        ({"amplitude": torch.ones(3)}, r"amplitude override has shape \(3,\); the layer has 8 units"),
        ({"lengthscale": torch.ones(8, 1)}, r"lengthscale override has shape \(8, 1\)"),
        ({"lengthscale": 0.0}, r"lengthscale override must be positive"),
        ({"amplitude": -torch.ones(8)}, r"amplitude override must be positive"),
        ({"noise_ratio": 0.0}, r"noise_ratio override must be positive"),
    ],
    ids=["unknown_key", "amplitude_shape", "lengthscale_rank", "zero_lengthscale",
         "negative_amplitude", "zero_noise"],
)
def test_bad_override_values(x20, values, message):
    with pytest.raises(gapa.ConfigurationError, match=message) as info:
        _fit(net(), x20, hyperparameters={"act": values})
    assert isinstance(info.value, ValueError)


# --- optional dependency -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"search": "faiss", "m": None}, {"m": 10, "inducing": "kmeans"}],
    ids=["faiss_search", "kmeans_inducing"],
)
def test_missing_faiss(monkeypatch, x20, kwargs):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(gapa.errors.MissingDependencyError, match=r"pip install faiss-cpu") as info:
        gapa.GAPA(net(), **kwargs).fit(x20, progress=False)
    assert isinstance(info.value, ImportError)


# --- operations without a variance rule ---------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "op"), [(SortHead, "sort"), (CumsumHead, "cumsum")], ids=["sort", "cumsum"]
)
def test_operation_without_variance_rule_names_op_and_module(x20, head, op):
    gm = _fit(net(head=head()), x20, layers="act")
    with pytest.raises(
        gapa.UnsupportedOperationError, match=rf"operation \S*{op} .*module 'head \({head.__name__}\)'"
    ) as info:
        gm(x20[:5])
    assert isinstance(info.value, NotImplementedError)


def test_dropout_in_training_mode_after_a_gapa_layer(x20):
    model = net(head=nn.Dropout(0.5)).train()
    with pytest.raises(gapa.ModelModeError, match=r"training mode.*Dropout.*model\.eval\(\)"):
        _fit(model, x20, layers="act")
    gm = _fit(model.eval(), x20, layers="act")
    model.train()  # switched back after the fit: every call refuses it
    with pytest.raises(gapa.ModelModeError, match=r"training mode.*Dropout.*model\.eval\(\)"):
        gm(x20[:5])
    model.eval()
    out = gm(x20[:5])
    with torch.no_grad():
        assert torch.equal(out.mean, model(x20[:5]))
    assert bool((out.var > 0).all())
