"""The Laplace classification baselines (laplace-torch) against hand-computed GLM logit moments,
and their predictive: the benchmark's variance scale fitted on validation, as GAPA's.

For the categorical likelihood the GGN of a Linear layer is Kronecker-factored by BackPACK's
KFLR as ``(Σ Jᵀ H J) ⊗ (Σ a aᵀ) / N`` with a bias block ``Σ Jᵀ H J``: ``a`` the layer's input,
``J = ∂f/∂(layer output)`` per row (``C x outputs``) and ``H = diag(p) - p pᵀ`` the softmax
Hessian at the MAP. Adding laplace's fitted prior precisions and inverting densely in float64
gives ``Σ``; a test row's variance of logit ``c`` is ``Σ_layers (J_c ⊗ a) Σ_w (J_c ⊗ a)ᵀ +
J_c Σ_b J_cᵀ``, and laplace's own probit predictive is ``softmax(f / sqrt(1 + π/8 · var))``.
Nothing of this reuses laplace's code, only its prior precisions (the chosen one, and a weak one
set here).
"""

from __future__ import annotations

import copy
from importlib.util import find_spec

import pytest
import torch
from torch import nn

from gapa.moments import Moments
from gapa.predictive.classification import fit_variance_scale, predict_classes, probit
from gapa_bench.baselines import laplace as lap
from gapa_bench.baselines.scores import LOGIT_METHOD
from gapa_bench.classifiers import build_classifier
from gapa_bench.data import images
from gapa_bench.data.images import FASHION_MNIST_DIR, ImageData, load_fashion_mnist, subset
from gapa_bench.errors import NotApplicableError

HAVE_LAPLACE = find_spec("laplace") is not None and find_spec("backpack") is not None
pytestmark = pytest.mark.skipif(
    not HAVE_LAPLACE, reason="laplace-torch / BackPACK not installed (make test installs them)"
)
_HAVE_FASHION = all((FASHION_MNIST_DIR / f"{stem}.gz").is_file() for stem in images._FILES.values())

METHODS = {"lastlayer": lap.fit_lla_lastlayer_classifier, "kfac": lap.fit_lla_kfac_classifier}
RTOL = 1e-9  # laplace in float64 (eigendecomposed Kronecker factors) against dense solves


pytestmark = pytest.mark.usefixtures("one_thread")


def _image_data(n: tuple[int, int, int], side: int, n_classes: int, seed: int) -> ImageData:
    """Random ``1 x side x side`` images labelled by a random linear rule (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(side * side, n_classes, generator=gen)
    xs = [torch.rand(k, 1, side, side, generator=gen) for k in n]
    ys = [(x.flatten(1) - 0.5).matmul(w).argmax(-1) for x in xs]
    classes = tuple(str(c) for c in range(n_classes))
    return ImageData("tiny", xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], classes)


def _train(model: nn.Module, data: ImageData, steps: int, lr: float = 1e-2) -> nn.Module:
    dtype = next(model.parameters()).dtype
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train.to(dtype)), data.y_train).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def data() -> ImageData:
    return _image_data((120, 40, 40), side=4, n_classes=3, seed=0)


@pytest.fixture(scope="module")
def backbone(data) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return _train(model, data, steps=300)


@pytest.fixture(scope="module")
def state(backbone) -> dict:
    """The caller's backbone before any fit."""
    return {k: v.clone() for k, v in backbone.state_dict().items()}


@pytest.fixture(scope="module")
def fitted(backbone, data, state) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lap, "FIT_BATCH", 50)  # three curvature batches (50, 50, 20) to sum up
        return {
            name: fit(backbone, data, seed=0, progress=False, train={})
            for name, fit in METHODS.items()
        }


def _linear_io(
    model: nn.Module, x: torch.Tensor, layers: list[nn.Linear]
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Logits ``f`` and ``(a, J)`` per layer: its input ``(N, in)`` and ``∂f/∂(its output)``
    ``(N, C, out)``, by one backward pass per class. Fills ``model``'s grads: pass a copy."""
    inputs, outputs = {}, {}

    def hook(module, args, out):
        inputs[module] = args[0].detach()
        out.retain_grad()
        outputs[module] = out

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        f = model(x)
    finally:
        for handle in handles:
            handle.remove()
    jac = {layer: [] for layer in layers}
    for c in range(f.shape[1]):
        for layer in layers:
            outputs[layer].grad = None
        f[:, c].sum().backward(retain_graph=True)
        for layer in layers:
            jac[layer].append(outputs[layer].grad.clone())
    return f.detach(), [(inputs[layer], torch.stack(jac[layer], 1)) for layer in layers]


def _hand_moments(
    backbone: nn.Module,
    x_train: torch.Tensor,
    x: torch.Tensor,
    layer_names: list[str],
    priors: list[tuple[float, float]],
) -> Moments:
    """The KFAC GLM logit mean and variance over the named Linear layers, ``priors`` =
    (weight, bias) prior precision per layer, from the module docstring's formulas in float64."""
    model = copy.deepcopy(backbone).double()
    layers = [dict(model.named_modules())[name] for name in layer_names]
    f_train, train = _linear_io(model, x_train.double(), layers)
    f, test = _linear_io(model, x.double(), layers)
    p = torch.softmax(f_train, -1)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C)
    var = torch.zeros_like(f)
    for (a, j), (a_test, j_test), (prior_w, prior_b) in zip(train, test, priors, strict=True):
        g = torch.einsum("nco,ncd,ndp->op", j, hess, j).contiguous()
        aa = (a.T @ a / len(a)).contiguous()
        eye_w = torch.eye(g.shape[0] * aa.shape[0], dtype=torch.float64)
        cov_w = torch.linalg.inv(torch.kron(g, aa) + prior_w * eye_w)
        cov_b = torch.linalg.inv(g + prior_b * torch.eye(g.shape[0], dtype=torch.float64))
        jw = torch.einsum("nco,ni->ncoi", j_test, a_test).flatten(2)  # weight.flatten() order
        var += torch.einsum("ncp,pq,ncq->nc", jw, cov_w, jw)
        var += torch.einsum("nco,op,ncp->nc", j_test, cov_b, j_test)
    return Moments(f, var)


def _laplace_probit(la, x: torch.Tensor) -> torch.Tensor:
    """laplace's own GLM probit predictive."""
    return torch.cat(lap._batched_predictive(la, x.double(), len(x), pred_type="glm",
                                             link_approx="probit"))


LAYERS = {"lastlayer": ["3"], "kfac": ["1", "3"]}  # the Linear layers each method treats


@pytest.mark.parametrize("method", METHODS)
def test_logit_moments_match_hand_kfac_and_laplaces_probit(method, fitted, backbone, data):
    la = fitted[method].handle
    x = torch.cat([data.x_val, data.x_test])
    chosen = la.prior_precision.clone()
    # at the chosen (scalar) prior, and at a weak one whose variances move the probabilities
    try:
        for prior in (fitted[method].info["prior_precision"], 0.3):
            la.prior_precision = prior
            priors = [(prior, prior)] * len(LAYERS[method])
            expected = _hand_moments(backbone, data.x_train, x, LAYERS[method], priors)
            got = lap._logit_moments(la, x.double(), 7)
            torch.testing.assert_close(got.mean, expected.mean, rtol=RTOL, atol=1e-12)
            torch.testing.assert_close(got.var, expected.var, rtol=RTOL, atol=1e-12)
            # the moments are those laplace's own predictive turns into probabilities
            torch.testing.assert_close(probit(got.mean, got.var), _laplace_probit(la, x),
                                       rtol=1e-12, atol=1e-14)
        with torch.no_grad():
            map_probs = torch.softmax(backbone(x.double()), -1)
        assert (probit(got.mean, got.var) - map_probs).abs().max() > 0.05
    finally:
        la.prior_precision = chosen


@pytest.mark.parametrize("method", METHODS)
def test_prediction_is_the_calibrated_predictive_of_the_moments(method, fitted, data):
    fit, la = fitted[method], fitted[method].handle
    x = torch.cat([data.x_val, data.x_test])
    moments = lap._logit_moments(la, x.double(), len(x))
    scale = fit.info["variance_scale"]
    expected = predict_classes(moments, LOGIT_METHOD, variance_scale=scale)
    torch.testing.assert_close(fit.predict(x), expected.probs, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fit.ood_scores["logit_variance"](x), moments.var.sum(-1),
                               rtol=1e-12, atol=1e-15)
    assert set(fit.ood_scores) == {"logit_variance"}


@pytest.mark.parametrize("method", METHODS)
def test_variance_scale_is_fitted_on_validation(method, fitted, data):
    fit, la = fitted[method], fitted[method].handle
    rows = lap.SCALE_VAL_ROWS_ALL_WEIGHTS if method == "kfac" else len(data.y_val)
    val = lap._logit_moments(la, data.x_val[:rows].double(), rows)
    expected = fit_variance_scale(val.mean, val.var, data.y_val[:rows], method=LOGIT_METHOD)
    assert fit.info["variance_scale"] == pytest.approx(expected.scale, rel=1e-9)
    assert fit.info["val_nll"] == pytest.approx(expected.nll, rel=1e-12)
    assert fit.info["scale_val_rows"] == min(rows, len(data.y_val))
    assert fit.info["variance_scale"] > 0  # the variance does something on this problem


def test_test_labels_do_not_move_the_scale(backbone, data, fitted, monkeypatch):
    relabelled = ImageData("tiny", data.x_train, data.y_train, data.x_val, data.y_val,
                           data.x_test, (data.y_test + 1) % data.n_classes, data.classes)
    monkeypatch.setattr(lap, "FIT_BATCH", 50)  # as `fitted`: the curvature sums in one order
    again = lap.fit_lla_lastlayer_classifier(backbone, relabelled, seed=0, progress=False,
                                             train={})
    assert again.info["variance_scale"] == fitted["lastlayer"].info["variance_scale"]


@pytest.mark.parametrize("method", METHODS)
def test_probabilities_are_a_distribution_with_the_map_class(method, fitted, backbone, data):
    x = torch.cat([data.x_val, data.x_test])
    probs = fitted[method].predict(x)
    assert probs.shape == (len(x), data.n_classes)
    assert probs.dtype == torch.float64  # the backbone's
    assert torch.isfinite(probs).all() and (probs > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(x), dtype=probs.dtype))
    with torch.no_grad():
        map_class = backbone(x.double()).argmax(-1)
    assert torch.equal(probs.argmax(-1), map_class)  # GAPA's default predictive keeps it


def test_lastlayer_prior_maximises_the_evidence(fitted):
    la = fitted["lastlayer"].handle
    best = la.prior_precision.clone()
    try:
        with torch.no_grad():
            at = float(la.log_marginal_likelihood(best))
            for factor in (0.8, 1.25):
                assert float(la.log_marginal_likelihood(best * factor)) < at
    finally:
        la.prior_precision = best
    assert at == pytest.approx(fitted["lastlayer"].info["log_marglik"], rel=1e-12)


def test_kfac_prior_minimises_validation_nll_over_the_grid(fitted, data):
    fit = fitted["kfac"]
    la, info = fit.handle, fit.info
    chosen = la.prior_precision.clone()
    nll = {}
    try:
        for prior in info["prior_grid"]:
            la.prior_precision = prior
            probs = _laplace_probit(la, data.x_val)  # what the grid search scores
            nll[prior] = -probs[torch.arange(len(probs)), data.y_val].log().mean().item()
    finally:
        la.prior_precision = chosen
    assert len(nll) == lap.GRID_SIZE and info["grid_val_rows"] == len(data.x_val)
    assert nll[info["prior_precision"]] == min(nll.values())


@pytest.mark.parametrize("method", METHODS)
def test_info_records_hyperparameters(method, fitted):
    info = fitted[method].info
    expected = {
        "lastlayer": ("last_layer", "marglik", 8 * 3 + 3),
        "kfac": ("all", "gridsearch", 16 * 8 + 8 + 8 * 3 + 3),
    }[method]
    assert (info["subset_of_weights"], info["prior_method"], info["n_params"]) == expected
    assert (info["hessian_structure"], info["backend"]) == ("kron", "BackPackGGN")
    assert (info["likelihood"], info["pred_type"], info["predictive"]) == (
        "classification", "glm", LOGIT_METHOD.value,
    )  # fmt: skip
    assert info.get("prior_link_approx") == ("probit" if method == "kfac" else None)
    assert {"variance_scale", "val_nll", "val_nll_map", "scale_val_rows"} <= set(info)
    assert "sigma_noise" not in info and info["seed"] == 0
    assert info["prior_structure"] == "scalar" and info["prior_precision"] > 0


def test_backbone_is_untouched(fitted, backbone, state, data):
    for fit in fitted.values():
        fit.predict(data.x_test)
    after = backbone.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(state[k], after[k]) for k in state), "fit or predict changed weights"
    assert all(p.requires_grad and p.grad is None for p in backbone.parameters())
    for module in backbone.modules():
        assert not module._forward_hooks and not module._backward_hooks
    assert not backbone.training


def test_batched_prediction_equals_one_batch(fitted, backbone, data, monkeypatch):
    monkeypatch.setattr(lap, "PREDICT_ELEMENTS", 7 * 3 * 163)  # 7 rows x 3 classes x 163 params
    small = lap.fit_lla_kfac_classifier(backbone, data, seed=0, progress=False, train={})
    x = torch.cat([data.x_val, data.x_test])
    variance = fitted["kfac"].ood_scores["logit_variance"]
    torch.testing.assert_close(small.ood_scores["logit_variance"](x), variance(x), rtol=1e-12,
                               atol=0)
    # the variance scale is Brent's minimiser (to 1e-6 in log space) of a validation NLL that
    # the batching changes in its last bits, so the probabilities agree to that tolerance only
    torch.testing.assert_close(small.predict(x), fitted["kfac"].predict(x), rtol=1e-6, atol=0)


def test_fitted_models_predict_in_any_order(fitted, data):
    """BackPACK's hooks live in one global context (see ``_rearm_backpack``)."""
    x = data.x_val
    first = {name: fit.predict(x) for name, fit in fitted.items()}
    for name in ("kfac", "lastlayer", "kfac", "kfac"):
        torch.testing.assert_close(fitted[name].predict(x), first[name], rtol=0, atol=0)


def _resnet(n_classes: int, side: int) -> nn.Module:
    torch.manual_seed(0)
    model = build_classifier("resnet", n_classes, in_shape=(1, side, side)).double()
    for module in model.modules():  # non-trivial running statistics for the eval-mode norms
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_resnet_last_layer_matches_hand_moments():
    data = _image_data((40, 10, 10), side=8, n_classes=3, seed=1)
    model = _resnet(3, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = lap.fit_lla_lastlayer_classifier(model, data, seed=0, progress=False, train={})
    prior = fit.info["prior_precision"]
    expected = _hand_moments(model, data.x_train, data.x_test, ["head"], [(prior, prior)])
    got = lap._logit_moments(fit.handle, data.x_test.double(), 4)
    torch.testing.assert_close(got.mean, expected.mean, rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(got.var, expected.var, rtol=RTOL, atol=1e-12)
    scale = fit.info["variance_scale"]
    torch.testing.assert_close(fit.predict(data.x_test), predict_classes(
        expected, LOGIT_METHOD, variance_scale=scale).probs, rtol=1e-9, atol=1e-12)
    assert fit.info["n_params"] == 64 * 3 + 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_resnet_all_weights_raises_configuration_error():
    data = _image_data((20, 5, 5), side=8, n_classes=3, seed=2)
    with pytest.raises(NotApplicableError, match=r"MLP backbone only.*SmallResNet"):
        lap.fit_lla_kfac_classifier(_resnet(3, 8), data, seed=0, progress=False, train={})


@pytest.mark.skipif(not _HAVE_FASHION, reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR}")
def test_fashion_mnist_last_layer_is_less_confident_than_the_map():
    data = subset(load_fashion_mnist(), 1000, 200)
    torch.manual_seed(0)
    model = _train(build_classifier("mlp"), data, steps=100, lr=1e-3)
    fit = lap.fit_lla_lastlayer_classifier(model, data, seed=0, progress=False, train={})
    probs = fit.predict(data.x_test)
    with torch.no_grad():
        logits = model(data.x_test)
    map_probs = torch.softmax(logits, -1)
    assert probs.shape == (200, 10) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(200))
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))

    def entropy(q):
        return -(q * q.clamp_min(1e-30).log()).sum(-1).mean()

    assert fit.info["variance_scale"] > 0 and entropy(probs) > entropy(map_probs)
    assert fit.info["n_params"] == 200 * 10 + 10
