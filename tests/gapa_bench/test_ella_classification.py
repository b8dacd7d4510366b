"""ELLA for C-class classifiers against the exact linearised Laplace approximation (softmax GGN)
on tiny float64 networks: an MLP and a SmallResNet with batch norm in eval mode."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from gapa.errors import ConfigurationError
from gapa.predictive.classification import fit_variance_scale, predict_classes
from gapa_bench.architectures import SmallResNet
from gapa_bench.baselines import ella
from gapa_bench.baselines.ella import (
    _features,
    _Linearised,
    _nystrom_directions,
    _select_prior_precision,
    exact_lla_logit_variance,
    fit_ella_classifier,
)
from gapa_bench.baselines.scores import LOGIT_METHOD
from gapa_bench.classifiers import build_classifier
from gapa_bench.data.images import ImageData

N_TRAIN, N_CLASSES, SIDE = 12, 3, 4  # 36 (input, class) rows < P: the Nyström span is a subspace
FEATURE_RTOL = 1e-12  # JVPs against products with full Jacobians: same sums, other order
SPAN_RTOL = 1e-8  # ELLA with the full Nyström span against exact LLA (float64 eigh, solves)
DELTA = 0.5  # the prior precision where the tests compare approximations


def _mlp(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 6), nn.Tanh(),
                        nn.Linear(6, N_CLASSES))
    return net.to(dtype).eval()


def _resnet(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """SmallResNet with 2 channels per stage (~300 parameters) and random batch-norm statistics,
    so that the eval-mode normalisation is not the identity."""
    torch.manual_seed(seed)
    net = SmallResNet(N_CLASSES, blocks=1, widths=(2, 2, 2))
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0.0, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0.0, 0.3)
    return net.to(dtype).eval()


NETS = {"mlp": _mlp, "resnet": _resnet}


def _data(dtype: torch.dtype = torch.float64, seed: int = 0, n_classes: int = N_CLASSES,
          side: int = SIDE, n_train: int = N_TRAIN) -> ImageData:
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, 1, side, side, generator=gen, dtype=dtype)
        return x, torch.randint(n_classes, (n,), generator=gen)

    (xt, yt), (xv, yv), (xs, ys) = draw(n_train), draw(20), draw(15)
    return ImageData(name="toy", x_train=xt, y_train=yt, x_val=xv, y_val=yv, x_test=xs,
                     y_test=ys, classes=tuple(str(c) for c in range(n_classes)))


def _jacobian_by_rows(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full Jacobian ``(n·C, P)``, rows example-major, one reverse pass per (input, class):
    independent of the module's vmap/jacrev path."""
    params = list(net.parameters())
    rows = []
    for xi in x:
        out = net(xi[None])[0]
        for c in range(len(out)):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([
                (torch.zeros_like(p) if g is None else g).reshape(-1)
                for g, p in zip(grads, params, strict=True)
            ]))
    return torch.stack(rows)


@pytest.fixture
def fixed_delta(monkeypatch):
    """Validation picks from a one-point grid, never widened: ELLA at the prior precision DELTA."""
    monkeypatch.setattr(ella, "CLASSIFIER_PRIOR_PRECISION_GRID",
                        torch.tensor([DELTA], dtype=torch.float64))
    monkeypatch.setattr(ella, "PRIOR_MAX_WIDENINGS", 0)


@pytest.mark.parametrize("arch", list(NETS))
def test_jvp_features_equal_full_jacobian_times_directions(arch):
    net, data = NETS[arch](torch.float64), _data()
    lin = _Linearised(net)
    directions, evals = _nystrom_directions(lin, data.x_train[:5], 6, n_outputs=N_CLASSES)
    x = torch.cat([data.x_train, data.x_test])
    expected = _jacobian_by_rows(net, x) @ directions
    got = _features(lin, directions, x, batch=7)
    assert got.shape == (len(x) * N_CLASSES, 6)
    torch.testing.assert_close(got, expected, rtol=FEATURE_RTOL, atol=FEATURE_RTOL)
    torch.testing.assert_close(directions.T @ directions, torch.eye(6, dtype=torch.float64))
    assert (evals[:-1] >= evals[1:]).all()


@pytest.mark.parametrize("arch", list(NETS))
def test_exact_reference_matches_function_space_form(arch):
    """The weight-space reference against the GP (function-space) form of the same posterior:
    with ``k = J Jᵀ/δ`` and ``L = blockdiag(Λ_n^{1/2})``,
    ``cov_q = k_qq - k_qX L (I + Lᵀ K_XX L)⁻¹ Lᵀ k_Xq`` (Woodbury; Λ_n is singular)."""
    net, data = NETS[arch](torch.float64), _data()
    jac = _jacobian_by_rows(net, data.x_train)
    jac_q = _jacobian_by_rows(net, data.x_test)
    with torch.no_grad():
        p = torch.softmax(net(data.x_train), -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    w, q = torch.linalg.eigh(lam)
    root = torch.block_diag(*(q @ torch.diag_embed(w.clamp(min=0).sqrt()) @ q.transpose(-1, -2)))
    k_xx, k_qx = jac @ jac.T / DELTA, jac_q @ jac.T / DELTA
    inner = torch.eye(len(root), dtype=torch.float64) + root @ k_xx @ root
    solve = torch.linalg.solve(inner, root @ k_qx.T)
    expected = (jac_q**2).sum(1) / DELTA - (k_qx @ root * solve.T).sum(1)
    got = exact_lla_logit_variance(net, data.x_train, data.x_test, DELTA)
    assert got.shape == (len(data.x_test), N_CLASSES)
    torch.testing.assert_close(got, expected.reshape(-1, N_CLASSES), rtol=1e-10, atol=0)


@pytest.mark.parametrize("arch", list(NETS))
def test_full_span_matches_exact_lla_at_training_inputs_and_bounds_it_elsewhere(arch):
    net, data = NETS[arch](torch.float64), _data()
    rows = N_TRAIN * N_CLASSES
    fitted = fit_ella_classifier(net, data, seed=0, progress=False, train={}, m=N_TRAIN, k=rows)
    jac = _jacobian_by_rows(net, data.x_train)
    assert fitted.info["k_used"] == int(torch.linalg.matrix_rank(jac))
    delta = fitted.info["prior_precision"]

    got = fitted.handle.logit_moments(data.x_train).var
    exact = exact_lla_logit_variance(net, data.x_train, data.x_train, delta)
    torch.testing.assert_close(got, exact, rtol=SPAN_RTOL, atol=0)

    # With V spanning the row space of J_train, the GGN lives inside it, so ELLA misses exactly
    # the prior variance of the part of J(x) outside the span: ELLA <= exact at new inputs.
    got_test = fitted.handle.logit_moments(data.x_test).var
    exact_test = exact_lla_logit_variance(net, data.x_train, data.x_test, delta)
    assert (got_test <= exact_test * (1 + SPAN_RTOL)).all()
    assert ((exact_test - got_test) > 1e-6 * exact_test).any()


@pytest.mark.parametrize("arch", list(NETS))
def test_error_to_exact_lla_shrinks_as_k_grows(arch, fixed_delta):
    net, data = NETS[arch](torch.float64), _data()
    x = torch.cat([data.x_train, data.x_test])
    exact = exact_lla_logit_variance(net, data.x_train, x, DELTA)
    # Top-k eigenvectors are nested and, per class c, ψ_c Σ ψ_cᵀ = max over w in span(V) of
    # (J_c(x) w)² / (wᵀ A w) with A = GGN + δI: each variance grows with k towards the exact one.
    gaps = []
    for k in (1, 2, 5, 10, 20, N_TRAIN * N_CLASSES):
        fitted = fit_ella_classifier(net, data, seed=0, progress=False, train={}, m=N_TRAIN, k=k)
        assert fitted.info["prior_precision"] == DELTA
        gaps.append(exact - fitted.handle.logit_moments(x).var)
    for small, large in itertools.pairwise(gaps):
        assert (large <= small + 1e-10 * exact).all()
    assert (gaps[-1] >= -1e-10 * exact).all()
    assert gaps[-1].mean() < 0.5 * gaps[1].mean()  # the full span is much closer than k = 2


def test_streamed_gram_matches_the_one_panel_gram(monkeypatch):
    """J_M larger than the Jacobian budget: panels and chunks give the same directions."""
    net, data = _resnet(torch.float64), _data()
    lin = _Linearised(net)
    whole, evals_whole = _nystrom_directions(lin, data.x_train, 10, n_outputs=N_CLASSES)
    row_bytes = lin.n_params * 8
    monkeypatch.setattr(ella, "_JACOBIAN_BUDGET", 5 * N_CLASSES * row_bytes)  # 5-input panels
    monkeypatch.setattr(ella, "_JACOBIAN_CHUNK", 2 * N_CLASSES)  # 2-input chunks
    streamed, evals_streamed = _nystrom_directions(lin, data.x_train, 10, n_outputs=N_CLASSES)
    torch.testing.assert_close(evals_streamed, evals_whole, rtol=1e-12, atol=0)
    # Eigenvectors are defined up to sign: compare the projectors V Vᵀ onto the span.
    torch.testing.assert_close(streamed @ streamed.T, whole @ whole.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", list(NETS))
def test_probabilities_mean_and_untouched_backbone(arch):
    net, data = NETS[arch](torch.float32), _data(torch.float32)
    net[1].bias.requires_grad_(False) if arch == "mlp" else net.head.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    fitted = fit_ella_classifier(net, data, seed=3, progress=False, train={"arch": arch},
                                 m=6, k=8)
    probs = fitted.predict(data.x_test)
    assert probs.shape == (len(data.x_test), N_CLASSES) and probs.dtype == torch.float32
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)), rtol=0, atol=1e-6)
    moments = fitted.handle.logit_moments(data.x_test)
    assert len(data.x_test) <= fitted.handle.batch or arch == "resnet"
    expected = torch.cat([net(xb) for xb in data.x_test.split(fitted.handle.batch)])
    assert torch.equal(moments.mean, expected)  # the backbone's own logits, batch by batch
    if len(data.x_test) <= fitted.handle.batch:
        assert torch.equal(moments.mean, net(data.x_test))
    assert (moments.var >= 0).all() and (moments.var > 0).any()
    scale = fitted.info["variance_scale"]
    assert torch.equal(probs, predict_classes(moments, LOGIT_METHOD, variance_scale=scale).probs)
    assert torch.equal(fitted.ood_scores["logit_variance"](data.x_test), moments.var.sum(-1))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [p.requires_grad for p in net.parameters()] == flags
    assert not any(mod.training for mod in net.modules())
    assert set(fitted.info) >= {"m", "k", "k_used", "prior_precision", "val_nll", "val_nll_map",
                                "variance_scale", "prior_precision_interior",
                                "prior_precision_grid", "prior_val_nll"}
    assert (fitted.info["m"], fitted.info["k"], fitted.info["k_used"]) == (6, 8, 8)
    lo, hi = fitted.info["prior_precision_grid"]
    assert lo <= fitted.info["prior_precision"] <= hi
    declared = ella.CLASSIFIER_PRIOR_PRECISION_GRID
    assert lo <= declared[0] and hi >= declared[-1]


def test_predict_is_batched_and_agrees_across_batches():
    net, data = _mlp(torch.float64), _data()
    fitted = fit_ella_classifier(net, data, seed=0, progress=False, train={}, m=4, k=5)
    whole = fitted.predict(data.x_test)
    fitted.handle.batch = 4  # four batches of at most 4 images
    torch.testing.assert_close(fitted.predict(data.x_test), whole, rtol=1e-12, atol=1e-14)


def test_seed_fixes_the_nystrom_points():
    net, data = _mlp(torch.float64), _data()
    a = fit_ella_classifier(net, data, seed=1, progress=False, train={}, m=4, k=5)
    b = fit_ella_classifier(net, data, seed=1, progress=False, train={}, m=4, k=5)
    c = fit_ella_classifier(net, data, seed=2, progress=False, train={}, m=4, k=5)
    va, vb, vc = (f.handle.logit_moments(data.x_test).var for f in (a, b, c))
    assert torch.equal(va, vb)
    assert torch.equal(a.predict(data.x_test), b.predict(data.x_test))
    assert not torch.equal(va, vc)


def test_default_sizes():
    net, data = _mlp(torch.float64), _data()
    fitted = fit_ella_classifier(net, data, seed=0, progress=False, train={})
    # 2000 // C = 666 inputs, capped at the 12 training images; k = min(20, 12 * 3)
    assert (fitted.info["m"], fitted.info["k"]) == (N_TRAIN, 20)
    assert fitted.info["nystrom_rows"] == N_TRAIN * N_CLASSES
    small = fit_ella_classifier(net, data, seed=0, progress=False, train={}, m=2)
    assert small.info["k"] == 2 * N_CLASSES


@pytest.mark.parametrize(
    ("m", "k"),
    [(4, 4 * N_CLASSES + 1), (N_TRAIN + 1, 2), (N_TRAIN + 1, None), (4, 0), (0, 0), (4.0, 2),
     (True, 1), (4, 2.0), (-1, 2)],
)
def test_bad_sizes_raise_configuration_error(m, k):
    net, data = _mlp(torch.float64), _data()
    with pytest.raises(ConfigurationError):
        fit_ella_classifier(net, data, seed=0, progress=False, train={}, m=m, k=k)


def test_wrong_classes_or_training_mode_raise_configuration_error():
    net = _mlp(torch.float64)
    with pytest.raises(ConfigurationError, match="n_classes"):
        fit_ella_classifier(net, _data(n_classes=4), seed=0, progress=False, train={}, m=2, k=2)
    resnet = _resnet(torch.float64).train()
    with pytest.raises(ConfigurationError, match="training mode"):
        fit_ella_classifier(resnet, _data(), seed=0, progress=False, train={}, m=2, k=2)
    with pytest.raises(ConfigurationError, match="max_params"):
        exact_lla_logit_variance(net, _data().x_train, _data().x_test, DELTA, max_params=10)


@pytest.mark.parametrize("arch", ["mlp", "resnet"])
def test_real_architectures_on_fashion_mnist_shapes(arch):
    """The benchmark's MLP (~199k parameters) and SmallResNet (~175k, batch norm) on 28x28
    images: ten classes, frozen buffers, probabilities that sum to one."""
    torch.manual_seed(0)
    net = build_classifier(arch).eval()
    data = _data(torch.float32, n_classes=10, side=28, n_train=8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fitted = fit_ella_classifier(net, data, seed=0, progress=False, train={"arch": arch},
                                 m=2, k=4)
    x = data.x_test[:6]
    probs = fitted.predict(x)
    assert probs.shape == (6, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6), rtol=0, atol=1e-6)
    moments = fitted.handle.logit_moments(x)
    expected = torch.cat([net(xb) for xb in x.split(fitted.handle.batch)])
    assert torch.equal(moments.mean, expected)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(mod.training for mod in net.modules())
    assert fitted.info["nystrom_rows"] == 20 and fitted.info["k_used"] == 4


def test_variance_scale_is_fitted_on_validation_only():
    net, data = _mlp(torch.float64), _data()
    fitted = fit_ella_classifier(net, data, seed=0, progress=False, train={}, m=4, k=5)
    val = fitted.handle.logit_moments(data.x_val)
    expected = fit_variance_scale(val.mean, val.var, data.y_val, method=LOGIT_METHOD)
    assert fitted.info["variance_scale"] == pytest.approx(expected.scale, rel=1e-9, abs=1e-12)
    assert fitted.info["val_nll"] == pytest.approx(expected.nll, rel=1e-12)
    relabelled = ImageData("toy", data.x_train, data.y_train, data.x_val, data.y_val,
                           data.x_test, (data.y_test + 1) % N_CLASSES, data.classes)
    again = fit_ella_classifier(net, relabelled, seed=0, progress=False, train={}, m=4, k=5)
    assert again.info["variance_scale"] == fitted.info["variance_scale"]
    assert torch.equal(again.predict(data.x_test), fitted.predict(data.x_test))


def _prior_problem(z: float, right: float, n: int = 400, logit: float = 5.0):
    """Two classes, one feature, a GGN of ~0: class 0's logit ``logit`` has the variance
    ``z² / δ`` and is right for a fraction ``right`` of the inputs, so the probit NLL is best at
    ``δ* = z² / v*`` with ``logit / sqrt(1 + π v*/8) = log(right / (1 - right))``."""
    gram = torch.full((1, 1), 1e-30, dtype=torch.float64)
    features = torch.zeros(n * 2, 1, dtype=torch.float64)
    features[0::2] = z  # class 0's row of every input
    logits = torch.tensor([[logit, 0.0]], dtype=torch.float64).expand(n, 2)
    y = (torch.arange(n) >= round(right * n)).long()  # class 0 for the first right * n
    return gram, features, logits, y


def _best_delta(z: float, right: float, logit: float = 5.0) -> float:
    v = ((logit / math.log(right / (1 - right))) ** 2 - 1) * 8 / math.pi
    return z * z / v


def test_prior_precision_interior_optimum_needs_no_widening():
    z = math.sqrt(100.0 * 86.0)  # δ* ≈ 100, inside 10^-4 ... 10^6
    choice = _select_prior_precision(*_prior_problem(z, 0.7))
    assert choice.widenings == 0 and choice.interior
    assert choice.grid == ella.CLASSIFIER_PRIOR_PRECISION_GRID.tolist()
    step = 10 ** (1 / ella.PRIOR_PER_DECADE)
    assert _best_delta(z, 0.7) / step < choice.delta < _best_delta(z, 0.7) * step


def test_prior_precision_grid_widens_to_an_optimum_beyond_its_end():
    z = math.sqrt(1e8 * 86.0)  # δ* ≈ 10^8, above the declared 10^6
    choice = _select_prior_precision(*_prior_problem(z, 0.7))
    assert choice.widenings == 1 and choice.interior
    assert choice.grid[0] == ella.CLASSIFIER_PRIOR_PRECISION_GRID[0]
    assert choice.grid[-1] == pytest.approx(1e6 * 10.0 ** ella.PRIOR_WIDEN_DECADES, rel=1e-9)
    step = 10 ** (1 / ella.PRIOR_PER_DECADE)
    assert _best_delta(z, 0.7) / step < choice.delta < _best_delta(z, 0.7) * step
    assert choice.val_nll < choice.val_nll_map


def test_prior_precision_without_optimum_is_recorded_as_not_interior():
    # every label is the MAP class: less variance is always better, the optimum is δ -> ∞
    choice = _select_prior_precision(*_prior_problem(10.0, 1.0))
    assert choice.widenings == ella.PRIOR_MAX_WIDENINGS and not choice.interior
    top = 1e6 * 10.0 ** (ella.PRIOR_WIDEN_DECADES * ella.PRIOR_MAX_WIDENINGS)
    assert choice.grid[-1] == pytest.approx(top, rel=1e-9)
    assert choice.grid[0] == ella.CLASSIFIER_PRIOR_PRECISION_GRID[0]  # the low end never moved
