"""Bad and degenerate inputs at fit and predict time: the typed error and what its message names,
or, for data GAPA must accept (one row, duplicated rows, inputs far from the data), finite
variances inside their documented bounds.

Cases already in ``test_errors.py`` (NaN/Inf in a training Tensor of one batch, NaN/-Inf at
predict with the diagonal propagation, a module that poisons some pre-activations, wrong width,
rank and dtype at predict, the three empty training sets) are not repeated here.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import gapa
from gapa.gp.numerics import VARIANCE_FLOOR, JitterWarning

WIDTH = 8

# small models: a second intra-op thread only contends on the two shared cores
pytestmark = pytest.mark.usefixtures("one_thread")


def net(*middle: tuple[str, nn.Module], act: type[nn.Module] = nn.Tanh, seed: int = 0,
        dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """fc1 -> [middle...] -> act (the GAPA layer) -> fc2, in eval mode, readable names."""
    torch.manual_seed(seed)
    mods = [("fc1", nn.Linear(3, WIDTH)), *middle, ("act", act()), ("fc2", nn.Linear(WIDTH, 2))]
    return nn.Sequential(OrderedDict(mods)).to(dtype).eval()


def deep(act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    """Two GAPA layers ("1" and "3") in a 3 -> 16 -> 16 -> 2 MLP."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 2)
    ).eval()


def fit(model: nn.Module, data, **kw) -> gapa.GAPA:
    kw.setdefault("m", None)
    batch_size = kw.pop("batch_size", 1024)
    return gapa.GAPA(model, **kw).fit(data, batch_size=batch_size, progress=False)


def assert_site_bounds(gm: gapa.GAPA, x: torch.Tensor, floor: float = 0.0) -> None:
    """Every GAPA unit's variance at ``x`` is finite and in ``[floor * a, a]``."""
    for key, z in gm.pre_activations(x).items():
        site = gm.sites[key]
        amp = site.hyperparameters.amplitude
        var = site.variance(z)
        assert bool(torch.isfinite(var).all()), key
        assert bool((var >= floor * amp).all()), (key, var.min())
        assert bool((var <= amp).all()), (key, (var - amp).max())


@pytest.fixture
def x40(gen) -> torch.Tensor:
    return torch.randn(40, 3, generator=gen)


# --- non-finite values -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_inputs_from_a_data_loader(x40, bad):
    x = x40.clone()
    x[13, 1] = bad  # in the second batch of 8 rows
    loader = DataLoader(TensorDataset(x, torch.zeros(40, 2)), batch_size=8)
    with pytest.raises(gapa.NonFiniteError, match=r"training inputs contain 1 NaN/Inf values"):
        fit(net(), loader)


@pytest.mark.parametrize("as_loader", [False, True], ids=["tensor", "data_loader"])
def test_non_finite_training_rows_are_numbered_in_the_whole_training_set(x40, as_loader):
    x = x40.clone()
    x[13, 1] = float("nan")
    data = DataLoader(TensorDataset(x), batch_size=8) if as_loader else x
    with pytest.raises(gapa.NonFiniteError, match=r"first rows: \[13\]"):
        fit(net(), data, batch_size=8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_predict_inputs_with_jacobian_propagation(x40, bad):
    gm = fit(net(), x40, propagation="jacobian")
    x = x40[:6].clone()
    x[4, 2] = bad
    with pytest.raises(gapa.NonFiniteError, match=r"inputs contain 1 NaN/Inf values \(first rows: \[4\]\)"):
        gm(x)


def test_a_linear_with_an_inf_weight_is_refused_at_fit(x40):
    """Finite inputs, but the Linear feeding the GAPA layer has one infinite weight: unit 0 of
    every cached row is +-Inf (or NaN), and fit names the call site and the rows."""
    model = net()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    assert bool(torch.isfinite(x40).all())
    with pytest.raises(
        gapa.NonFiniteError,
        match=r"pre-activations at 'act' contain 40 NaN/Inf values \(first rows: \[0, 1, 2, 3, 4\]\)",
    ):
        fit(model, x40)


def test_non_finite_activations_in_a_later_batch_are_refused(x40):
    """The cache is checked as a whole: a module that overflows only on the last batch's rows
    is caught too, with the row numbers of the whole cache."""

    class Overflow(nn.Module):
        def forward(self, h):
            return h * torch.where(h.abs().sum(1, keepdim=True) > 1e3, float("inf"), 1.0)

    x = x40.clone()
    x[37] = 1e4  # finite, but fc1 then Overflow make its pre-activations infinite
    model = net(("overflow", Overflow()))
    with pytest.raises(gapa.NonFiniteError, match=r"pre-activations at 'act' contain \d+ NaN/Inf "
                                                  r"values \(first rows: \[37\]\)"):
        fit(model, x, batch_size=8)


# --- shapes, dtypes, devices -------------------------------------------------------------------


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
@pytest.mark.parametrize(
    ("shape", "shown"),
    [((3,), "(3,)"), ((4, 2), "(4, 2)"), ((2, 3, 1), "(2, 3, 1)")],
    ids=["rank1", "width2", "rank3"],
)
def test_wrong_shape_at_predict(x40, propagation, shape, shown):
    gm = fit(net(), x40, propagation=propagation)
    with pytest.raises(gapa.InputError, match=re.escape(f"inputs of shape {shown}") + r".*"
                       + re.escape("(batch, 3)") + r".*feature count and rank"):
        gm(torch.randn(*shape))


def test_wrong_shape_in_pre_activations(x40):
    gm = fit(net(), x40)
    with pytest.raises(gapa.InputError, match=re.escape("(5, 4)") + r".*" + re.escape("(batch, 3)")):
        gm.pre_activations(torch.randn(5, 4))


def test_training_batches_of_another_width_are_refused(x40):
    batches = [x40[:8], torch.randn(8, 4)]  # any iterable of input batches is accepted
    with pytest.raises(gapa.InputError, match=re.escape("(8, 4)") + r".*" + re.escape("(batch, 3)")):
        fit(net(), batches)


@pytest.mark.parametrize(
    ("model_dtype", "input_dtype"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float32, torch.float16)],
    ids=["f64_into_f32", "f32_into_f64", "f16_into_f32"],
)
def test_dtype_mixing_at_fit(x40, model_dtype, input_dtype):
    pattern = rf"inputs are {re.escape(str(input_dtype))} on cpu but the model's parameters are " \
              rf"{re.escape(str(model_dtype))} on cpu"
    with pytest.raises(gapa.InputError, match=pattern):
        fit(net(dtype=model_dtype), x40.to(input_dtype))


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
def test_dtype_mixing_at_predict(x40, propagation):
    gm = fit(net(dtype=torch.float64), x40.double(), propagation=propagation)
    with pytest.raises(gapa.InputError, match=r"inputs are torch\.float32 on cpu but the model's "
                                              r"parameters are torch\.float64"):
        gm(x40[:5])
    with pytest.raises(gapa.InputError, match=r"torch\.float32.*torch\.float64"):
        gm.pre_activations(x40[:5])


def test_site_refuses_pre_activations_of_another_dtype(x40):
    gm = fit(net(), x40)
    site = gm.sites["act"]
    with pytest.raises(gapa.InputError, match=r"'act' was fitted in torch\.float32 on cpu but "
                                              r"received torch\.float64 on cpu"):
        site.variance(torch.zeros(3, WIDTH, dtype=torch.float64))
    with pytest.raises(gapa.InputError, match=rf"'act' has {WIDTH} units .*shape \(3, 5\)"):
        site.variance(torch.zeros(3, 5))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="device mixing needs a CUDA device; none is available here")


@CUDA
def test_cpu_inputs_for_a_cuda_model_at_fit(x40):
    with pytest.raises(gapa.InputError, match=r"on cpu but the model's parameters are "
                                              r"torch\.float32 on cuda"):
        fit(net().cuda(), x40)


@CUDA
def test_device_mixing_at_predict(x40):
    gm = fit(net().cuda(), x40.cuda())
    with pytest.raises(gapa.InputError, match=r"on cpu but the model's parameters are "
                                              r"torch\.float32 on cuda"):
        gm(x40[:5])
    site = gm.sites["act"]
    with pytest.raises(gapa.InputError, match=r"fitted in torch\.float32 on cuda.*received "
                                              r"torch\.float32 on cpu"):
        site.variance(torch.zeros(3, WIDTH))


# --- empty and one-row training sets -------------------------------------------------------------


class _Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


@pytest.mark.parametrize(
    "data",
    [lambda: _Empty(), lambda: DataLoader(_Empty(), batch_size=4), lambda: [],
     # three rows, but the only (incomplete) batch is dropped
     lambda: DataLoader(TensorDataset(torch.randn(3, 3)), batch_size=4, drop_last=True)],
    ids=["empty_dataset", "loader_of_empty_dataset", "empty_list", "all_batches_dropped"],
)
def test_other_empty_training_sets(data):
    with pytest.raises(gapa.errors.EmptyDataError, match=r"yielded no rows"):
        fit(net(), data())


def test_batches_that_are_all_empty_are_an_empty_training_set():
    with pytest.raises(gapa.errors.EmptyDataError, match=r"yielded no rows"):
        fit(net(), [torch.empty(0, 3), torch.empty(0, 3)])


@pytest.mark.parametrize(
    "options",
    [{"m": None}, {}, {"m": None, "conditioning": "exact"}],
    ids=["m_none", "m_default", "exact"],
)
def test_one_training_row(gen, options):
    model = deep(nn.Tanh)
    one = torch.randn(1, 3, generator=gen)
    gm = gapa.GAPA(model, layers=["1", "3"], **options).fit(one, progress=False)
    for site in gm.sites.values():
        assert site.cache_size == 1 and site.n_conditioning == 1
    queries = torch.cat([one, torch.randn(20, 3, generator=gen) * 3])
    out = gm(queries)
    with torch.no_grad():
        assert torch.equal(out.mean, model(queries))
    assert bool(torch.isfinite(out.var).all()) and bool((out.var > 0).all())
    assert_site_bounds(gm, queries)
    # at the row itself: the closed form a * r / (1 + r), far below the prior amplitude
    for key, z in gm.pre_activations(one).items():
        site = gm.sites[key]
        amp, noise = site.hyperparameters.amplitude, site.hyperparameters.noise
        torch.testing.assert_close(site.variance(z)[0], amp * noise / (1 + noise))


@pytest.mark.parametrize("options", [{"m": None}, {}], ids=["m_none", "m_default"])
def test_one_training_row_with_two_neighbours(gen, options):
    m = options.get("m", 512)
    # the plan made from the first batch refuses it before the GP is built
    with pytest.raises(gapa.ConfigurationError, match=r"k=2 neighbours exceed the 1 conditioning "
                                                      rf"rows of site 'act' \(m={m}, 1 inputs"):
        gapa.GAPA(net(), k=2, **options).fit(torch.randn(1, 3, generator=gen), progress=False)
    # data of unknown size are not planned: the site refuses it
    with pytest.raises(gapa.ConfigurationError, match=r"k=2 neighbours .*only 1 rows \(cache 1, "
                                                      rf"m={m}\); lower k"):
        gapa.GAPA(net(), k=2, **options).fit([torch.randn(1, 3, generator=gen)], progress=False)


# --- models left in training mode --------------------------------------------------------------


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b.clone() for k, b in model.named_buffers()}


def test_dropout_in_training_mode_is_refused(x40):
    model = net(("drop", nn.Dropout(0.3))).train()
    with pytest.raises(gapa.ModelModeError, match=r"training mode \(.*Dropout.*\) and two identical "
                                                  r"forward passes gave different outputs.*model\.eval\(\)"):
        fit(model, x40)
    model.eval()
    gm = fit(model, x40)
    out = gm(x40[:5])
    with torch.no_grad():
        assert torch.equal(out.mean, model(x40[:5]))
    assert bool(torch.isfinite(out.var).all())


def test_only_the_module_in_training_mode_is_named(x40):
    model = net(("drop", nn.Dropout(0.3)))
    model.drop.train()
    with pytest.raises(gapa.ModelModeError, match=r"training mode \(Dropout\)"):
        fit(model, x40)


@pytest.mark.parametrize("as_loader", [False, True], ids=["tensor", "data_loader"])
def test_batch_norm_in_training_mode_is_refused_and_its_buffers_are_kept(x40, as_loader):
    model = net(("bn", nn.BatchNorm1d(WIDTH)))
    with torch.no_grad():  # running statistics that are not the defaults
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.num_batches_tracked.fill_(7)
    model.train()
    before = _bn_state(model)
    data = DataLoader(TensorDataset(x40, torch.zeros(40)), batch_size=16) if as_loader else x40
    with pytest.raises(gapa.ModelModeError, match=r"BatchNorm1d.*changed the buffers "
                                                  r"\['bn\.running_mean', 'bn\.running_var', "
                                                  r"'bn\.num_batches_tracked'\].*model\.eval\(\)"):
        fit(model, data)
    after = _bn_state(model)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert model.training  # the mode is the user's: GAPA does not switch it


def test_batch_norm_in_training_mode_with_one_row(gen):
    model = net(("bn", nn.BatchNorm1d(WIDTH))).train()
    with pytest.raises(gapa.ModelModeError, match=r"BatchNorm1d.*model\.eval\(\)"):
        fit(model, torch.randn(1, 3, generator=gen))


def test_deterministic_model_in_training_mode_fits(x40):
    model = deep(nn.Tanh).train()
    assert all(m.training for m in model.modules())
    gm = gapa.GAPA(model, layers=["1", "3"], m=None).fit(x40, progress=False)
    q = x40[:5] * 2
    out = gm(q)
    with torch.no_grad():
        assert torch.equal(out.mean, model(q))
    assert bool(torch.isfinite(out.var).all()) and bool((out.var > 0).all())


def test_training_mode_does_not_change_the_fitted_gps(x40):
    """A deterministic model gives the same GPs in training and in eval mode: the determinism
    check's two extra forward passes must not reach the cache (they once did, tripling the
    first batch's rows)."""
    model = deep(nn.Tanh)
    q = x40[:5] * 2
    ref = gapa.GAPA(model, layers=["1", "3"], m=None).fit(x40, progress=False)
    ref_var = ref(q).var
    model.train()
    gm = gapa.GAPA(model, layers=["1", "3"], m=None).fit(x40, progress=False)
    assert {k: s.cache_size for k, s in gm.sites.items()} == {"1": 40, "3": 40}
    torch.testing.assert_close(gm(q).var, ref_var, rtol=0, atol=0)


# --- duplicated cached rows ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"k": 1}, {"k": 4}, {"conditioning": "exact"}],
    ids=["k1", "k4", "exact"],
)
def test_training_set_of_duplicated_rows(gen, options):
    """200 copies of 3 distinct rows: the Gram matrices are (nearly) singular but for the noise.
    Jitter warnings are allowed; the variances must stay finite and inside their bounds."""
    model = deep(nn.Tanh)
    distinct = torch.randn(3, 3, generator=gen)
    x = distinct.repeat(200, 1)
    queries = torch.cat([distinct, x[:10] + 1e-3, torch.randn(20, 3, generator=gen) * 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JitterWarning)
        gm = gapa.GAPA(model, layers=["1", "3"], m=None, **options).fit(x, progress=False)
        out = gm(queries)
        assert bool(torch.isfinite(out.var).all())
        for site in gm.sites.values():
            assert site.cache_size == 600
        assert_site_bounds(gm, queries, floor=VARIANCE_FLOOR)
        # at the distinct rows the 200 copies make the variance small
        for key, z in gm.pre_activations(distinct).items():
            site = gm.sites[key]
            assert bool((site.variance(z) < site.hyperparameters.amplitude).all())


def test_duplicated_rows_keep_a_lengthscale_of_the_distinct_values(gen):
    """Copies make most random pairs identical; the lengthscale must come from the distinct
    values, so a query 1e-3 from a cached row is still almost certain (not at the prior)."""
    distinct = torch.randn(3, 3, generator=gen)
    gm = gapa.GAPA(deep(nn.Tanh), layers=["1"], m=None).fit(distinct.repeat(200, 1),
                                                            progress=False)
    site = gm.sites["1"]
    spread = site.rows.max(0).values - site.rows.min(0).values
    assert bool((site.hyperparameters.lengthscale > 1e-3 * spread).all())
    z = gm.pre_activations(distinct + 1e-3)["1"]
    assert bool((site.variance(z) < 0.1 * site.hyperparameters.amplitude).all())


# --- inputs far outside the data -----------------------------------------------------------------


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
@pytest.mark.parametrize("conditioning", ["local", "exact"])
def test_inputs_a_million_times_the_data_scale(gen, propagation, conditioning):
    """With ReLU every GAPA layer's pre-activation grows with the input, so at 1e6 times the
    data scale every unit is far from its cache and returns to the prior amplitude."""
    model = deep(nn.ReLU)
    x = torch.randn(200, 3, generator=gen)
    kw = {"k": 4} if conditioning == "local" else {}
    gm = gapa.GAPA(model, layers=["1", "3"], m=None, conditioning=conditioning,
                   propagation=propagation, **kw).fit(x, progress=False)
    far = torch.randn(16, 3, generator=gen) * 1e6
    pre = gm.pre_activations(far)
    assert set(pre) == {"1", "3"}
    for key, z in pre.items():
        site = gm.sites[key]
        amp = site.hyperparameters.amplitude
        var = site.variance(z)
        assert bool(torch.isfinite(var).all())
        torch.testing.assert_close(var, amp.expand_as(var), rtol=1e-6, atol=0)
    out = gm(far)
    with torch.no_grad():
        assert torch.equal(out.mean, model(far))
    assert bool(torch.isfinite(out.var).all()) and bool((out.var > 0).all())


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
def test_saturating_activation_far_from_the_data(gen, propagation):
    """Tanh: the first GAPA layer is far from its cache (variance = amplitude), the second
    sees saturated inputs; the output variance stays finite."""
    model = deep(nn.Tanh)
    x = torch.randn(200, 3, generator=gen)
    gm = gapa.GAPA(model, layers=["1", "3"], m=None, propagation=propagation).fit(x, progress=False)
    far = torch.randn(16, 3, generator=gen) * 1e6
    z = gm.pre_activations(far)["1"]
    site = gm.sites["1"]
    var = site.variance(z)
    torch.testing.assert_close(var, site.hyperparameters.amplitude.expand_as(var), rtol=1e-6, atol=0)
    assert_site_bounds(gm, far)
    assert bool(torch.isfinite(gm(far).var).all())


@pytest.mark.parametrize(("propagation", "where"), [
    ("diagonal", r"at the output of module '2' \(Linear\)"),
    ("jacobian", r"in the squared gradients .* call site '1'"),
])
def test_a_variance_that_overflows_is_refused_and_located(propagation, where):
    """A head weight of 1e200 keeps the mean finite (1e200 x tanh) but squares the variance
    past float64's range: the variance is never returned, and the error names where it broke."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double().eval()
    with torch.no_grad():
        model[2].weight.mul_(1e200)
    x = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    gm = gapa.GAPA(model, ["1"], propagation=propagation).fit(x)
    query = 3 * torch.randn(5, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert bool(torch.isfinite(model(query)).all())
    lengthscale = gm.sites["1"].hyperparameters.lengthscale.clone()
    for _ in range(2):  # the failure leaves the object as it was: the same error again
        with pytest.raises(gapa.NonFiniteError, match=where):
            gm(query)
    assert torch.equal(gm.sites["1"].hyperparameters.lengthscale, lengthscale)


def test_a_variance_whose_sum_overflows_is_returned():
    """256 output variances of 1e306 each are finite, and are returned; only their sum
    overflows, which the finiteness check must not mistake for a non-finite variance."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 256)).double().eval()
    x = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    gm = gapa.GAPA(model, ["1"]).fit(x)
    query = 3 * torch.randn(1, 3, generator=gen, dtype=torch.float64)
    v0 = gm(query).var[0]
    with torch.no_grad():  # each output's variance scales with its weight row squared
        model[2].weight.mul_(torch.sqrt(1e306 / v0).unsqueeze(-1))
    var = gapa.GAPA(model, ["1"]).fit(x)(query).var  # the head does not enter the fit
    assert bool(torch.isinf(var.sum())) and bool(torch.isfinite(var).all())
    torch.testing.assert_close(var[0], torch.full_like(var[0], 1e306), rtol=1e-9, atol=0.0)
