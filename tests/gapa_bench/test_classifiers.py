"""Image classifiers (training, cache) and the classification baselines that need no library:
kNN OOD scores, MC dropout, deep ensembles."""

from __future__ import annotations

import inspect

import pytest
import torch

from gapa.errors import ConfigurationError
from gapa_bench.baselines.dropout import (
    DROPOUT_RATES,
    fit_mc_dropout_classifier,
    mc_dropout_average,
    mc_dropout_probs,
)
from gapa_bench.baselines.ensemble import fit_ensemble_classifier, member_seeds
from gapa_bench.baselines.knn import K_CANDIDATES, fit_knn, penultimate_features
from gapa_bench.baselines.scores import entropy
from gapa_bench.classifiers import (
    ENSEMBLE_MEMBERS,
    build_classifier,
    cached_classifier,
    networks_needed,
)
from gapa_bench.data.images import ImageData
from gapa_bench.metrics import classification_report

TRAIN = {"arch": "mlp", "epochs": 2, "batch_size": 32}


@pytest.fixture
def images(tmp_path, monkeypatch) -> ImageData:
    """Three classes of 8x8 images told apart by which third is bright; a fresh cache dir."""
    monkeypatch.setenv("GAPA_CACHE_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(0)

    def draw(n):
        y = torch.arange(n) % 3
        x = 0.3 * torch.rand(n, 1, 8, 8, generator=gen)
        for c in range(3):
            x[y == c, :, :, 3 * c:3 * c + 2] += 0.7
        return x, y

    (xt, yt), (xv, yv), (xs, ys) = draw(240), draw(60), draw(60)
    return ImageData("toy", xt, yt, xv, yv, xs, ys, classes=("a", "b", "c"))


def test_cache_hit_returns_the_same_weights(images):
    model, path, trained = cached_classifier(images, seed=0, progress=False, **TRAIN)
    again, path2, trained2 = cached_classifier(images, seed=0, progress=False, **TRAIN)
    assert trained and not trained2 and path == path2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  again.state_dict().values(), strict=True))
    other = cached_classifier(images, seed=1, progress=False, **TRAIN)[1]
    assert other != path
    acc = (model(images.x_test).argmax(-1) == images.y_test).double().mean()
    assert acc > 0.9  # an easy task: training did train


def test_unknown_settings_and_architectures_raise(images):
    with pytest.raises(ConfigurationError, match="unknown training settings"):
        cached_classifier(images, progress=False, arch="mlp", epoch=3)
    with pytest.raises(ConfigurationError, match="unknown architecture"):
        build_classifier("vit")


def test_resnet_dropout_copy_adds_only_dropout_modules():
    plain = build_classifier("resnet")
    dropped = build_classifier("resnet", dropout=0.2)
    names = {n for n, _ in dropped.named_modules()} - {n for n, _ in plain.named_modules()}
    assert names and all(isinstance(dropped.get_submodule(n), torch.nn.Dropout) for n in names)


def test_networks_needed_lists_backbones_members_and_dropout_copies():
    needed = networks_needed(["map", "ensemble", "mc_dropout"], 2)
    assert {"seed": 0} in needed and {"seed": 1} in needed
    for s in range(2):
        for m in member_seeds(s, ENSEMBLE_MEMBERS)[1:]:
            assert {"seed": m} in needed
        for p in DROPOUT_RATES:
            assert {"seed": s, "dropout": p} in needed
    assert networks_needed(["map"], 2) == [{"seed": 0}, {"seed": 1}]


def test_knn_score_is_the_kth_neighbour_distance(images):
    model = cached_classifier(images, progress=False, **TRAIN)[0]
    fitted = fit_knn(model, images, seed=0, progress=False, train=TRAIN, k=5)
    feats = torch.nn.functional.normalize(penultimate_features(model, images.x_train), dim=1)
    query = torch.nn.functional.normalize(penultimate_features(model, images.x_test), dim=1)
    brute = torch.cdist(query, feats).sort(dim=1).values[:, 4]
    torch.testing.assert_close(fitted.ood_scores["distance"](images.x_test), brute, rtol=1e-4,
                               atol=1e-5)
    assert set(fitted.ood_scores) == {"distance"}
    with torch.no_grad():
        assert torch.equal(fitted.predict(images.x_test), torch.softmax(model(images.x_test), -1))
    assert fitted.info["selection"] == {"criterion": fitted.info["selection"]["criterion"],
                                        "candidates": {"k": [5]}, "chosen": {"k": 5},
                                        "tried": [{"k": 5, "score": None}]}


def test_knn_uses_its_declared_k(images, monkeypatch):
    from gapa_bench.baselines import knn

    model = cached_classifier(images, progress=False, **TRAIN)[0]
    monkeypatch.setattr(knn, "K_CANDIDATES", (7,))
    fitted = fit_knn(model, images, seed=0, progress=False, train=TRAIN)
    assert fitted.info["k"] == 7 and fitted.info["selection"]["candidates"] == {"k": [7]}
    monkeypatch.setattr(knn, "K_CANDIDATES", (7, 9))
    with pytest.raises(ConfigurationError, match="no validation criterion"):
        fit_knn(model, images, seed=0, progress=False, train=TRAIN)
    assert K_CANDIDATES == (knn.K_NEIGHBOURS,)


def test_mc_dropout_is_seeded_leaves_random_state_and_eval_mode(images):
    fitted = fit_mc_dropout_classifier(None, images, seed=0, progress=False, train=TRAIN, samples=8)
    state = torch.random.get_rng_state()
    a, b = fitted.predict(images.x_test), fitted.predict(images.x_test)
    assert torch.equal(a, b) and torch.equal(state, torch.random.get_rng_state())
    torch.testing.assert_close(a.sum(-1), torch.ones(len(a)))
    model = cached_classifier(images, seed=0, dropout=fitted.info["p"], progress=False,
                              **TRAIN)[0]
    one = mc_dropout_probs(model, images.x_test, samples=1, seed=3)
    with torch.no_grad():
        plain = torch.softmax(model(images.x_test), -1)
    assert not torch.equal(one, plain)  # masks were drawn
    assert not model.training and not any(m.training for m in model.modules())
    with pytest.raises(ConfigurationError, match=r"no nn\.Dropout"):
        mc_dropout_probs(build_classifier("mlp", 3, in_shape=(1, 8, 8)), images.x_test,
                         samples=2, seed=0)


def test_mc_dropout_rate_is_chosen_on_validation_and_recorded(images):
    fitted = fit_mc_dropout_classifier(None, images, seed=0, progress=False, train=TRAIN,
                                       rates=(0.1, 0.3), samples=4)
    sel = fitted.info["selection"]
    assert sel["candidates"] == {"p": [0.1, 0.3]} and sel["criterion"] == "validation NLL"
    nll = {}
    for p in (0.1, 0.3):
        model = cached_classifier(images, seed=0, dropout=p, progress=False, **TRAIN)[0]
        probs = mc_dropout_probs(model, images.x_val, samples=4, seed=0)
        nll[p] = classification_report(probs, images.y_val)["nll"]
    assert [(t["p"], t["score"]) for t in sel["tried"]] == list(nll.items())
    assert sel["chosen"] == {"p": min(nll, key=nll.get)} and fitted.info["p"] == sel["chosen"]["p"]
    default = inspect.signature(fit_mc_dropout_classifier).parameters["rates"].default
    assert fitted.fit_s > 0 and default == DROPOUT_RATES


def test_mc_dropout_mutual_information_is_that_of_its_passes(images):
    fitted = fit_mc_dropout_classifier(None, images, seed=0, progress=False, train=TRAIN,
                                       samples=6)
    model = cached_classifier(images, seed=0, dropout=fitted.info["p"], progress=False,
                              **TRAIN)[0]
    average = mc_dropout_average(model, images.x_test, samples=6, seed=0)
    mi = fitted.ood_scores["mutual_information"](images.x_test)
    assert torch.equal(fitted.predict(images.x_test), average.probs)
    assert torch.equal(mi, average.mutual_information) and set(fitted.ood_scores) == {
        "mutual_information"}
    assert (mi >= 0).all() and (mi > 0).any()  # the masks disagree somewhere
    one = mc_dropout_average(model, images.x_test, samples=1, seed=0).mutual_information
    assert torch.equal(one, torch.zeros_like(one))  # one pass cannot disagree with itself


def test_ensemble_averages_member_softmaxes(images):
    fitted = fit_ensemble_classifier(None, images, seed=0, progress=False, train=TRAIN, members=3)
    members = [cached_classifier(images, seed=s, progress=False, **TRAIN)[0]
               for s in member_seeds(0, 3)]
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(images.x_test), -1) for m in members]).mean(0)
    torch.testing.assert_close(fitted.predict(images.x_test), expected)
    assert fitted.fit_s > 0 and fitted.info["member_seeds"] == member_seeds(0, 3)
    with torch.no_grad():
        each = [torch.softmax(m(images.x_test), -1) for m in members]
    by_hand = entropy(expected) - torch.stack([entropy(p) for p in each]).mean(0)
    mi = fitted.ood_scores["mutual_information"](images.x_test)
    torch.testing.assert_close(mi, by_hand.clamp_min(0), rtol=1e-4, atol=1e-6)
    assert (mi > 0).any()  # independently trained members disagree
