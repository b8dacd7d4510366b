"""Variances are never silently wrong: threads, inference mode, graphs cut by the network,
failed calls that must leave the object as it was, a model changed after the fit, and a
GAPA inside another GAPA's model."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import gapa
from helpers import mlp

# --- fixtures -----------------------------------------------------------------------------------


def _data(n: int = 300, d: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _fitted(propagation: str = "diagonal", **kw) -> tuple[gapa.GAPA, nn.Module]:
    model = mlp([3, 16, 16, 2], seed=1)
    kw.setdefault("m", 64)
    gm = gapa.GAPA(model, layers=["1", "3"], propagation=propagation, **kw)
    return gm.fit(_data(), progress=False), model


def _snapshot(gm: gapa.GAPA, x: torch.Tensor, tmp_path, name: str):
    """What a user can observe of a GAPA: its outputs, its factor, and the bytes it saves."""
    out = gm(x)
    path = gm.save(tmp_path / f"{name}.gapa")
    return out.mean, out.var, gm.lengthscale_factor, path.read_bytes()


def _same(a, b) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2] == b[2]
    assert a[3] == b[3]


# --- threads -----------------------------------------------------------------------------------


def _run_threads(jobs, threads: int = 4, repeats: int = 25):
    """Run every job ``repeats`` times in each of ``threads`` threads at once; the results of
    each (thread, repetition) and any exception raised."""
    results: dict = {}
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(i: int) -> None:
        try:
            start.wait()
            for r in range(repeats):
                job = jobs[(i + r) % len(jobs)]
                results[(i, r)] = (job, job())
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results, errors


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
def test_concurrent_calls_equal_serial_calls(propagation):
    gm, _ = _fitted(propagation)
    inputs = [3 * _data(40, seed=s) for s in range(4)]
    serial = {id(x): gm(x) for x in inputs}
    jobs = [lambda x=x: (x, gm(x)) for x in inputs]
    results, errors = _run_threads(jobs)
    assert not errors, errors[:3]
    for _, (x, out) in results.values():
        assert torch.equal(out.mean, serial[id(x)].mean)
        assert torch.equal(out.var, serial[id(x)].var)


def test_two_gapas_on_one_model_and_plain_forwards_run_concurrently():
    """Two GAPA objects on the same network and plain forwards of it, all at once: each gives
    what it gives alone, and the plain forward is never touched."""
    model = mlp([3, 16, 16, 2], seed=1)
    first = gapa.GAPA(model, layers=["1"], m=64).fit(_data(), progress=False)
    second = gapa.GAPA(model, layers=["3"], k=3, m=None, propagation="jacobian").fit(
        _data(), progress=False)
    x = 3 * _data(40, seed=5)
    with torch.no_grad():
        plain = model(x)
    alone = {"first": first(x), "second": second(x)}

    def plain_forward():
        with torch.no_grad():
            return model(x)

    jobs = [lambda: ("first", first(x)), lambda: ("second", second(x)),
            lambda: ("plain", plain_forward())]
    results, errors = _run_threads(jobs, threads=6)
    assert not errors, errors[:3]
    for _, (name, out) in results.values():
        if name == "plain":
            assert torch.equal(out, plain)
        else:
            assert torch.equal(out.mean, alone[name].mean)
            assert torch.equal(out.var, alone[name].var)


# --- inference mode and graphs cut by the network -----------------------------------------------


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
def test_inference_mode_gives_the_same_moments(propagation):
    gm, _ = _fitted(propagation)
    x = 3 * _data(20, seed=3)
    expected = gm(x)
    assert bool((expected.var > 0).all())
    with torch.inference_mode():
        inside = gm(torch.clone(x))
    assert torch.equal(inside.mean, expected.mean)
    assert torch.equal(inside.var, expected.var)


class Detaching(nn.Module):
    """A network that cuts the autograd graph after its activation, one way or another."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc1, self.act, self.fc2 = nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.how == "detach":
            return self.fc2(h.detach())
        if self.how == "data":
            return self.fc2(h.data)
        if self.how == "partly":  # a straight-through style mix: half the path survives
            return self.fc2(h) + self.fc2(h).detach()
        with torch.no_grad():
            return self.fc2(h)


@pytest.mark.parametrize("how", ["detach", "no_grad_head", "data", "partly"])
def test_jacobian_refuses_a_network_that_cuts_its_graph(how):
    torch.manual_seed(0)
    model = Detaching(how).eval()
    gm = gapa.GAPA(model, layers=["act"], m=None, propagation="jacobian")
    gm.fit(_data(), progress=False)
    with pytest.raises(gapa.UnsupportedOperationError, match="propagation='diagonal'"):
        gm(_data(5))
    with pytest.raises(gapa.UnsupportedOperationError):
        gm.calibrate(_data(50), torch.randn(50, 2))
    assert gm.calibration is None
    diagonal = gapa.GAPA(model, layers=["act"], m=None).fit(_data(), progress=False)
    if how != "data":  # .data is no torch function: only the Jacobian pass can see the cut
        assert bool((diagonal(_data(5)).var > 0).all())


# --- failures leave the object as it was ----------------------------------------------------------


def test_failed_calibrate_leaves_everything_as_it_was(tmp_path):
    gm, _ = _fitted()
    x = 3 * _data(30, seed=7)
    xv, yv = _data(60, seed=8), torch.randn(60, 2)
    gm.calibrate(xv, yv, lengthscale_factors=[0.5, 1.0, 2.0])
    before = _snapshot(gm, x, tmp_path, "before")
    calibration = gm.calibration
    with pytest.raises(gapa.InputError, match="targets"):
        gm.calibrate(xv, yv[:, :1])  # wrong target shape, found after the first factor
    bad = xv.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(gapa.NonFiniteError):
        gm.calibrate(bad, yv)
    with pytest.raises(gapa.ConfigurationError):
        gm.calibrate(xv, yv, lengthscale_factors=[1.0, float("inf")])
    assert gm.calibration is calibration
    _same(before, _snapshot(gm, x, tmp_path, "after"))


def test_failed_calibrate_classifier_leaves_everything_as_it_was(tmp_path):
    gm, _ = _fitted()
    x = 3 * _data(30, seed=7)
    xv, labels = _data(60, seed=8), torch.randint(0, 2, (60,))
    gm.calibrate_classifier(xv, labels, lengthscale_factors=[0.5, 1.0])
    before = _snapshot(gm, x, tmp_path, "before")
    fitted = gm.class_calibration
    for bad in (torch.full((60,), 5), labels[:10], labels.float()):
        with pytest.raises(gapa.GAPAError):
            gm.calibrate_classifier(xv, bad)
    assert gm.class_calibration is fitted
    _same(before, _snapshot(gm, x, tmp_path, "after"))


def test_failed_fit_leaves_the_earlier_fit_working(tmp_path):
    gm, _ = _fitted()
    x = 3 * _data(30, seed=7)
    gm.calibrate(_data(60, seed=8), torch.randn(60, 2))
    before = _snapshot(gm, x, tmp_path, "before")
    late_nan = _data()
    late_nan[250, 0] = float("nan")
    failures = [
        (RuntimeError, dict(data=torch.randn(50, 5))),  # another width: the model refuses it
        (gapa.errors.MemoryBudgetError, dict(data=_data(), memory_budget=1000)),
        (gapa.NonFiniteError, dict(data=late_nan, batch_size=100)),
        (gapa.InputError, dict(data=None)),
    ]
    for i, (error, kwargs) in enumerate(failures):
        with pytest.raises(error):
            gm.fit(progress=False, **kwargs)
        _same(before, _snapshot(gm, x, tmp_path, f"after{i}"))
        assert gm.calibration is not None


def test_lengthscale_factor_is_applied_or_refused():
    gm, _ = _fitted()
    x = 3 * _data(30, seed=7)
    gm.calibrate(_data(60, seed=8), torch.randn(60, 2), lengthscale_factors=None)
    base = gm(x).var
    for bad in (0.0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(gapa.ConfigurationError):
            gm.lengthscale_factor = bad
    assert torch.equal(gm(x).var, base) and gm.calibration is not None
    gm.lengthscale_factor = 4.0
    assert gm.lengthscale_factor == 4.0
    assert gm.calibration is None  # fitted at another factor
    assert bool((gm(x).var != base).any())
    twin, _ = _fitted()
    twin.calibrate(_data(60, seed=8), torch.randn(60, 2), lengthscale_factors=[4.0])
    assert torch.equal(gm(x).var, twin(x).var)


# --- the model changed after the fit -----------------------------------------------------------


def test_weights_changed_after_fit_are_refused_until_restored():
    gm, model = _fitted()
    x = _data(10, seed=4)
    expected = gm(x)
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    with pytest.raises(gapa.ModelChangedError, match="refit"):
        gm(x)
    with torch.no_grad():
        model[0].weight[0, 0] -= 1.0
    out = gm(x)  # the same bytes again: accepted
    assert torch.equal(out.var, expected.var)
    model.load_state_dict(mlp([3, 16, 16, 2], seed=1).state_dict())  # same weights, rewritten
    assert torch.equal(gm(x).var, expected.var)
    model.load_state_dict(mlp([3, 16, 16, 2], seed=2).state_dict())
    with pytest.raises(gapa.ModelChangedError):
        gm(x)


def test_model_put_back_in_training_mode_is_refused_and_not_modified():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
    model.eval()
    gm = gapa.GAPA(model, layers=["2"], m=None).fit(_data(), progress=False)
    x = _data(10, seed=4)
    expected = gm(x)
    model.train()
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    for propagation in ("diagonal", "jacobian"):
        gm.propagation = propagation
        with pytest.raises(gapa.ModelModeError, match=r"BatchNorm1d.*model\.eval\(\)"):
            gm(x)
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    model.eval()
    gm.propagation = "diagonal"
    assert torch.equal(gm(x).var, expected.var)


# --- GAPA inside a GAPA's model -----------------------------------------------------------------


class Wrapper(nn.Module):
    """A network whose forward asks an inner GAPA for its moments (an ensemble head, a
    gating rule) and returns a function of both."""

    def __init__(self, inner_model: nn.Module, inner: gapa.GAPA):
        super().__init__()
        self.body = inner_model
        self.inner = inner
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        moments = self.inner(x)
        return self.head(moments.mean) + 0.0 * moments.var.detach().sum()


def test_a_gapa_inside_the_model_of_another_gapa():
    inner_model = mlp([3, 16, 16, 2], seed=1)
    inner = gapa.GAPA(inner_model, layers=["1"], m=64).fit(_data(), progress=False)
    torch.manual_seed(0)
    outer_model = Wrapper(inner_model, inner).eval()
    outer = gapa.GAPA(outer_model, layers=["body.3"], m=64).fit(_data(), progress=False)
    x = 3 * _data(8, seed=9)
    out = outer(x)
    with torch.no_grad():
        assert torch.equal(out.mean, outer_model(x))
    assert bool((out.var > 0).all()) and bool(torch.isfinite(out.var).all())
    # the inner GAPA still answers as before
    assert torch.equal(inner(x).var, gapa.GAPA(inner_model, layers=["1"], m=64).fit(
        _data(), progress=False)(x).var)


# --- found in review ------------------------------------------------------------------------------


class WritesIntoGapaOutput(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.head = nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)

    def forward(self, x):
        h = self.act(self.fc1(x))
        h.mul_(2.0)  # the network scales the activation in place
        return self.head(h)


@pytest.mark.parametrize("frozen", [False, True])
def test_jacobian_follows_an_in_place_write_into_the_gapa_output(frozen):
    """The network gets a copy of the GAPA output, so what is differentiated is never written:
    the Jacobian variance equals the diagonal one (exact here: one linear layer after)."""
    model = WritesIntoGapaOutput().eval()
    model.requires_grad_(not frozen)
    x = 3 * _data(6, seed=2)
    out = {p: gapa.GAPA(model, layers=["act"], m=None, propagation=p).fit(
        _data(), progress=False)(x) for p in ("diagonal", "jacobian")}
    assert torch.equal(out["jacobian"].mean, out["diagonal"].mean)
    torch.testing.assert_close(out["jacobian"].var, out["diagonal"].var, rtol=1e-5, atol=0)


class InPlaceActivationAliased(nn.Module):
    """ReLU(inplace=True) whose result is ignored: the network reads the tensor it wrote."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.head = nn.Linear(3, 16), nn.ReLU(inplace=True), nn.Linear(16, 2)

    def forward(self, x):
        h = self.fc1(x)
        self.act(h)
        h.mul_(2.0)
        return self.head(h)


def test_jacobian_refuses_a_write_into_the_tensor_an_in_place_activation_returned():
    model = InPlaceActivationAliased().eval()
    gm = gapa.GAPA(model, layers=["act"], m=None, propagation="jacobian").fit(
        _data(), progress=False)
    with pytest.raises(gapa.UnsupportedOperationError, match="wrote in place"):
        gm(_data(4))
    model.requires_grad_(False)  # frozen: the path from the ignored copy is cut
    with pytest.raises(gapa.UnsupportedOperationError, match="propagation='diagonal'"):
        gm(_data(4))
    diagonal = gapa.GAPA(model, layers=["act"], m=None).fit(_data(), progress=False)
    assert bool((diagonal(3 * _data(4)).var > 0).all())


class OnAnotherThread(nn.Module):
    """Runs its body in a worker thread once ``threaded`` is set (as nn.DataParallel does)."""

    def __init__(self):
        super().__init__()
        self.body = mlp([3, 16, 16, 2], seed=1)
        self.threaded = False

    def forward(self, x):
        if not self.threaded:
            return self.body(x)
        box = []
        worker = threading.Thread(target=lambda: box.append(self.body(x)))
        worker.start()
        worker.join()
        return box[0]


@pytest.mark.parametrize("propagation", ["diagonal", "jacobian"])
def test_gapa_layers_run_on_another_thread_are_refused(propagation):
    model = OnAnotherThread().eval()
    gm = gapa.GAPA(model, layers=["body.1"], m=None, propagation=propagation)
    gm.fit(_data(), progress=False)
    model.threaded = True
    with pytest.raises(gapa.UnsupportedOperationError, match="ran in this thread"):
        gm(_data(4))


def test_a_fit_in_training_mode_survives_save_and_load(tmp_path):
    """A model without dropout or BatchNorm, never put in eval mode: the fit found it
    deterministic, and so does the loaded state."""
    model = mlp([3, 16, 2], seed=1).train()
    gm = gapa.GAPA(model, m=None).fit(_data(), progress=False)
    x = _data(5, seed=3)
    loaded = gapa.GAPA.load(gm.save(tmp_path / "s.gapa"), model)
    assert torch.equal(loaded(x).var, gm(x).var)


def test_weights_replaced_through_data_are_refused():
    gm, model = _fitted()
    x = _data(4, seed=2)
    gm(x)
    model[0].weight.data = model[0].weight.data * 3.0
    with pytest.raises(gapa.ModelChangedError):
        gm(x)


def test_lengthscale_factors_from_numpy_tensors_and_generators():
    import numpy as np

    gm, _ = _fitted()
    xv, yv = _data(60, seed=8), torch.randn(60, 2)
    ref = gm.calibrate(xv, yv, lengthscale_factors=[0.25, 0.5, 1.0, 2.0, 4.0]).nll
    for factors in (np.geomspace(0.25, 4, 5), torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0]),
                    (f for f in (0.25, 0.5, 1.0, 2.0, 4.0)), [np.float32(0.25), 0.5, 1, 2, 4]):
        assert gm.calibrate(xv, yv, lengthscale_factors=factors).nll == pytest.approx(ref)
