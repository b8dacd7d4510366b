"""``gapa-bench lm``: token-level uncertainty of a real pretrained language model.

SmolLM2-135M (:mod:`gapa_bench.language`) reads Jane Austen. Every method is fitted on five
novels; validation and test are the two halves of the sixth (*Persuasion*), cut into sequences
of ``length`` tokens. Out-of-distribution sets: German fortunes, English fortunes, FOLDOC
entries (:mod:`gapa_bench.data.text`) and the test sequences with their tokens shuffled.

Every choice (GAPA's layer and variance scale, the temperature, Laplace's prior precision) is
made on validation next-token NLL from candidates declared here and written to the record; the
test set is scored once. Position ``t`` predicts token ``t + 1``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import Tensor

from gapa import GAPA
from gapa.moments import Moments
from gapa.predictive.classification import predict_classes

from .data.text import austen_novels, load_text_set
from .metrics import _check, ood_report, unit_interval

HELD_OUT = "persuasion"
OOD_SETS = ("fortunes-de", "fortunes-en", "foldoc")
GAPA_BLOCKS = (2, 15, 29)  # the candidates of ``gapa``; block 2 is the paper's early placement
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.5, 2.0, 13))
PRIOR_PRECISIONS = tuple(float(p) for p in np.geomspace(1e-2, 1e6, 9))
# GAPA's lengthscale factor is not searched here: each factor's variance-scale fit reads every
# validation logit of a 49k-word vocabulary (about 13 minutes per candidate layer on 2 cores)
LENGTHSCALE_FACTORS = (1.0,)
_log = partial(print, flush=True)  # progress lines, seen at once in a redirected log
KNN_K = 50
COVERAGES = (0.5, 0.8, 0.9)


def act_site(block: int) -> str:
    """The MLP activation of a Llama block: where GAPA goes."""
    return f"model.layers.{block}.mlp.act_fn"


# --- data ----------------------------------------------------------------------------------------


def token_chunks(tokenizer, texts: Sequence[str], length: int) -> Tensor:
    """Concatenate ``texts`` (separated by blank lines), tokenise, cut into ``length`` tokens."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    n = ids.numel() // length
    return ids[: n * length].view(n, length)


def _take(chunks: Tensor, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return chunks[torch.randperm(chunks.shape[0], generator=g)[:n]]


@dataclass
class LMData:
    """Token ids ``(n, length)`` of every split and set."""

    fit: Tensor
    val: Tensor
    test: Tensor
    ood: dict[str, Tensor]


def austen_chunks(tokenizer, length: int) -> tuple[Tensor, Tensor]:
    """Chunks of ``length`` tokens of the five fit novels, and of the held-out one, in order."""
    novels = austen_novels()
    fit = token_chunks(tokenizer, [t for name, t in novels.items() if name != HELD_OUT], length)
    return fit, token_chunks(tokenizer, [novels[HELD_OUT]], length)


def lm_data(tokenizer, *, n_fit: int, n_eval: int, length: int, seed: int = 0) -> LMData:
    """Build the splits: fit on five novels, validation and test from halves of the sixth."""
    fit, held = austen_chunks(tokenizer, length)
    half = held.shape[0] // 2
    test = _take(held[half:], n_eval, seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    shuffled = torch.stack([row[torch.randperm(length, generator=g)] for row in test])
    ood = {"austen-shuffled": shuffled}
    for name in OOD_SETS:
        docs = load_text_set(name)
        order = np.random.default_rng(seed).permutation(len(docs))
        ood[name] = _take(token_chunks(tokenizer, [docs[i] for i in order], length), n_eval, seed)
    return LMData(_take(fit, n_fit, seed), _take(held[:half], n_eval, seed + 1), test, ood)


# --- per-token quantities ------------------------------------------------------------------------


@dataclass
class Tokens:
    """Per scored token (``(n, length - 1)``): NLL, top-1 hit, top-1 confidence and scores."""

    nll: Tensor
    correct: Tensor
    confidence: Tensor
    scores: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: Sequence[Tokens]) -> Tokens:
        return Tokens(torch.cat([p.nll for p in parts]), torch.cat([p.correct for p in parts]),
                      torch.cat([p.confidence for p in parts]),
                      {k: torch.cat([p.scores[k] for p in parts]) for k in parts[0].scores})


def next_token_stats(probs: Tensor, ids: Tensor, scores: Mapping[str, Tensor]) -> Tokens:
    """Score ``probs[:, t]`` against ``ids[:, t + 1]``; ``scores`` are per position."""
    p = probs[:, :-1].double()
    target = ids[:, 1:]
    picked = p.gather(-1, target[..., None]).squeeze(-1)
    conf, top = p.max(-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    out = {"entropy": entropy, "maxprob": 1.0 - conf}
    out.update({k: v[:, :-1].double() for k, v in scores.items()})
    return Tokens(-picked.clamp_min(1e-300).log(), (top == target).double(), conf, out)


# --- methods -------------------------------------------------------------------------------------


class Method:
    """A fitted method: per-token predictive and scores of a batch of token ids."""

    name: str = ""
    choice: dict

    def __call__(self, ids: Tensor) -> Tokens:  # pragma: no cover - interface
        raise NotImplementedError


class Plain(Method):
    """The network's softmax, optionally at a temperature; entropy and max-probability."""

    def __init__(self, model, temperature: float = 1.0, name: str = "plain"):
        self.model, self.temperature, self.name = model, temperature, name
        self.choice = {"temperature": temperature}

    def __call__(self, ids):
        with torch.no_grad():
            logits = self.model(ids).logits
        return next_token_stats(torch.softmax(logits.double() / self.temperature, -1), ids, {})


class FeatureScore(Method):
    """The plain softmax with a distance score on the final hidden states."""

    def __init__(self, model, name: str, score: Callable[[Tensor], Tensor], choice: dict):
        self.model, self.name, self.score, self.choice = model, name, score, choice

    def __call__(self, ids):
        with torch.no_grad():
            out = self.model(ids, output_hidden_states=True)
        h = out.hidden_states[-1]
        return next_token_stats(torch.softmax(out.logits.double(), -1), ids,
                                {"distance": self.score(h)})


def mahalanobis(features: Tensor) -> Callable[[Tensor], Tensor]:
    """Distance to one Gaussian of the fit tokens' final hidden states (tied covariance): a
    49k-class conditional Gaussian as in Lee et al. (2018) has no data per class here."""
    f = features.double()
    mean = f.mean(0)
    cov = torch.cov((f - mean).T) + 1e-6 * torch.eye(f.shape[1], dtype=f.dtype)
    chol = torch.linalg.cholesky(cov)

    def score(h: Tensor) -> Tensor:
        z = torch.linalg.solve_triangular(chol, (h.double() - mean).reshape(-1, f.shape[1]).T,
                                          upper=False)
        return z.square().sum(0).reshape(h.shape[:-1])

    return score


def deep_knn(features: Tensor, k: int = KNN_K) -> Callable[[Tensor], Tensor]:
    """Minus the cosine similarity to the k-th nearest fit token (Sun et al. 2022), by faiss."""
    import faiss

    f = torch.nn.functional.normalize(features.float(), dim=-1).numpy()
    index = faiss.IndexFlatIP(f.shape[1])
    index.add(f)

    def score(h: Tensor) -> Tensor:
        q = torch.nn.functional.normalize(h.float(), dim=-1).reshape(-1, f.shape[1]).numpy()
        sims, _ = index.search(q, k)
        return -torch.from_numpy(sims[:, -1]).double().reshape(h.shape[:-1])

    return score


class LastLayerLaplace(Method):
    """Laplace on the output head ``W`` (no bias), diagonal GGN over its entries.

    ``H_kd = sum_n p_nk (1 - p_nk) h_nd^2`` is the exact diagonal of the generalised Gauss-Newton
    for softmax cross-entropy (laplace-torch's ``diag`` structure; it cannot form the 49k-output
    Jacobians its predictive needs, so the closed form is used, and tested against it on a small
    head). Logit variance ``sum_d h_d^2 / (H_kd + prior)``; probit predictive.
    """

    name = "lla_lastlayer"

    def __init__(self, model, ggn_diag: Tensor, prior: float):
        self.model, self.ggn, self.prior = model, ggn_diag, prior
        self.choice = {"prior_precision": prior}

    @staticmethod
    def moments(hidden: Tensor, logits: Tensor, ggn: Tensor, prior: float) -> Moments:
        """The logit moments at final hidden states ``hidden``."""
        return Moments(logits, hidden.square() @ (1.0 / (ggn + prior)).T.to(hidden.dtype))

    @staticmethod
    def probs(hidden: Tensor, logits: Tensor, ggn: Tensor, prior: float) -> Tensor:
        return predict_classes(LastLayerLaplace.moments(hidden, logits, ggn, prior),
                               "probit").probs

    def __call__(self, ids):
        with torch.no_grad():
            out = self.model(ids, output_hidden_states=True)
        m = self.moments(out.hidden_states[-1], out.logits, self.ggn, self.prior)
        pred = predict_classes(m, "probit")
        return next_token_stats(pred.probs, ids, {"logit_var": m.var.sum(-1)})


def head_ggn_diagonal(hidden: Tensor, logits: Tensor) -> Tensor:
    """One batch's ``sum_n p_nk (1 - p_nk) h_nd^2`` for ``(n, d)`` states and ``(n, C)`` logits."""
    p = torch.softmax(logits.double(), -1)
    return (p * (1.0 - p)).T @ hidden.double().square()


class GapaMethod(Method):
    """A fitted and calibrated GAPA: its predictive, summed logit variance and the GP variance
    at its layer."""

    def __init__(self, gm: GAPA, name: str, choice: dict):
        self.gm, self.name, self.choice = gm, name, choice

    def __call__(self, ids):
        out, scores = self.gm.scored(ids)  # one pass for both
        cal = self.gm.class_calibration
        pred = predict_classes(out, cal.method, variance_scale=cal.scale)
        layer = sum(scores.values())
        return next_token_stats(pred.probs, ids, {"logit_var": out.var.sum(-1),
                                                  "layer_var": layer})


# --- metrics -------------------------------------------------------------------------------------


def token_metrics(t: Tokens) -> dict:
    """Perplexity, NLL, top-1 ECE and Brier, error-detection AUROC and selective accuracy."""
    from torchmetrics.functional.classification import binary_auroc, binary_calibration_error

    nll, correct, conf = _check(nll=t.nll.flatten(), correct=t.correct.flatten(),
                                confidence=t.confidence.flatten())  # a NaN raises
    out = {
        "perplexity": float(nll.mean().exp()), "nll": float(nll.mean()),
        "accuracy": float(correct.mean()),
        "ece": float(binary_calibration_error(conf, correct.long(), n_bins=15)),
        "brier": float((conf - correct).square().mean()),
        "error_auroc": {}, "selective": {},
    }
    wrong = (1 - correct).long()
    for name, score in t.scores.items():
        (s,) = _check(**{name: score.flatten()})
        out["error_auroc"][name] = float(binary_auroc(unit_interval(s), wrong))
        order = torch.argsort(s, stable=True)  # most certain first
        hits = correct[order].cumsum(0) / torch.arange(1, s.numel() + 1, dtype=torch.float64)
        sel = {f"acc@{c:g}": float(hits[max(int(c * s.numel()) - 1, 0)]) for c in COVERAGES}
        sel["aurc"] = float((1 - hits).mean())  # area under the risk-coverage curve
        out["selective"][name] = sel
    return out


def sequence_scores(t: Tokens) -> dict[str, Tensor]:
    """Each score averaged over a sequence's tokens."""
    return {name: s.mean(-1) for name, s in t.scores.items()}


def ood_metrics(test: Tokens, ood: Mapping[str, Tokens]) -> dict:
    """Sequence-level AUROC and FPR95 per set and score, test Austen as the negatives."""
    neg = sequence_scores(test)
    return {name: {score: ood_report(neg[score], pos)
                   for score, pos in sequence_scores(t).items()}
            for name, t in ood.items()}


# --- running -------------------------------------------------------------------------------------


class PeakMemory:
    """The process's peak resident memory above its level at entry, sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def evaluate(method: Method, ids: Tensor, batch: int) -> tuple[Tokens, float, float]:
    """Run ``method`` over ``ids``; return its tokens, seconds and peak extra memory (MiB)."""
    parts = []
    with PeakMemory() as mem:
        start = time.perf_counter()
        for i in range(0, ids.shape[0], batch):
            parts.append(method(ids[i:i + batch]))
        seconds = time.perf_counter() - start
    return Tokens.cat(parts), seconds, mem.extra_mb


def plain_outputs(model, ids: Tensor, batch: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(ids, final hidden states, logits)`` of the plain model, batch by batch."""
    for i in range(0, ids.shape[0], batch):
        with torch.no_grad():
            o = model(ids[i:i + batch], output_hidden_states=True)
        yield ids[i:i + batch], o.hidden_states[-1], o.logits


def _cached_nll(outputs, probs: Callable[[Tensor, Tensor], Tensor]) -> float:
    """Mean next-token NLL of ``probs(hidden, logits)`` over cached plain outputs."""
    return float(Tokens.cat([next_token_stats(probs(h, z), ids, {})
                             for ids, h, z in outputs]).nll.mean())


def fit_plain_features(model, ids: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Final hidden states of every fit token, and the head's GGN diagonal over them."""
    feats, ggn = [], None
    for _, hidden, logits in plain_outputs(model, ids, batch):  # the logits are not kept
        h = hidden.reshape(-1, hidden.shape[-1])
        feats.append(h)
        part = head_ggn_diagonal(h, logits.reshape(-1, logits.shape[-1]))
        ggn = part if ggn is None else ggn + part
    return torch.cat(feats), ggn


def _fit_gapa(model, data: LMData, block: int | None, batch: int, **kw) -> tuple[GAPA, dict]:
    layers = "auto" if block is None else [act_site(block)]
    gm = GAPA(model, layers=layers, **kw).fit(data.fit, batch_size=batch)
    cal = gm.calibrate_classifier(data.val, data.val, next_token=True, batch_size=batch,
                                  lengthscale_factors=LENGTHSCALE_FACTORS)
    return gm, {"layers": list(gm.layers), "variance_scale": cal.scale, "val_nll": cal.nll,
                "map_val_nll": cal.map_nll, **kw}


def fit_methods(model, data: LMData, names: Sequence[str], batch: int,
                log: Callable[[str], None] = _log,
                ) -> dict[str, tuple[Method, float]]:
    """Fit every method in ``names``; return each with its fit seconds."""
    fitted: dict[str, tuple[Method, float]] = {}
    if {"mahalanobis", "knn", "lla_lastlayer"} & set(names):
        start = time.perf_counter()
        feats, ggn = fit_plain_features(model, data.fit, batch)
        feature_seconds = time.perf_counter() - start
        log(f"fit features of {data.fit.numel()} tokens: {feature_seconds:.0f} s")
    if "plain" in names:
        fitted["plain"] = (Plain(model), 0.0)
    if {"temperature", "lla_lastlayer"} & set(names):  # both searches reuse these outputs
        val = list(plain_outputs(model, data.val, batch))
    if "temperature" in names:
        t0 = time.perf_counter()
        nll = {t: _cached_nll(val, lambda h, z, t=t: torch.softmax(z.double() / t, -1))
               for t in TEMPERATURES}
        best = min(nll, key=nll.get)
        m = Plain(model, best, name="temperature")
        m.choice = {"temperature": best, "candidates": list(TEMPERATURES)}
        fitted["temperature"] = (m, time.perf_counter() - t0)
    if "mahalanobis" in names:
        t0 = time.perf_counter()
        m = FeatureScore(model, "mahalanobis", mahalanobis(feats), {"covariance": "tied"})
        fitted["mahalanobis"] = (m, feature_seconds + time.perf_counter() - t0)
    if "knn" in names:
        t0 = time.perf_counter()
        fitted["knn"] = (FeatureScore(model, "knn", deep_knn(feats), {"k": KNN_K}),
                         feature_seconds + time.perf_counter() - t0)
    if "lla_lastlayer" in names:
        t0 = time.perf_counter()
        nll = {p: _cached_nll(val, lambda h, z, p=p: LastLayerLaplace.probs(h, z, ggn, p))
               for p in PRIOR_PRECISIONS}
        best = min(nll, key=nll.get)
        m = LastLayerLaplace(model, ggn, best)
        m.choice = {"prior_precision": best, "candidates": list(PRIOR_PRECISIONS),
                    "structure": "diagonal GGN of the head's weights"}
        fitted["lla_lastlayer"] = (m, feature_seconds + time.perf_counter() - t0)
    gapa_names = [n for n in names if n.startswith("gapa")]
    candidates: dict[int, tuple[GAPA, dict, float]] = {}
    if any(n in gapa_names for n in ("gapa", "gapa_prior", "gapa_block2")):
        for block in (GAPA_BLOCKS if {"gapa", "gapa_prior"} & set(gapa_names) else (2,)):
            t0 = time.perf_counter()
            gm, info = _fit_gapa(model, data, block, batch)
            candidates[block] = (gm, info, time.perf_counter() - t0)
            log(f"gapa at block {block}: val NLL {info['val_nll']:.4f} "
                f"(scale {info['variance_scale']:.3g}), {candidates[block][2]:.0f} s")
    if "gapa_block2" in gapa_names:
        gm, info, sec = candidates[2]
        fitted["gapa_block2"] = (GapaMethod(gm, "gapa_block2", info), sec)
    chosen = None
    if {"gapa", "gapa_prior"} & set(gapa_names):
        chosen = min(candidates, key=lambda b: candidates[b][1]["val_nll"])
        gm, info, _ = candidates[chosen]
        choice = {**info, "candidates": {b: c[1]["val_nll"] for b, c in candidates.items()}}
        fitted["gapa"] = (GapaMethod(gm, "gapa", choice), sum(c[2] for c in candidates.values()))
    if "gapa_prior" in gapa_names:
        t0 = time.perf_counter()
        gm, info = _fit_gapa(model, data, chosen, batch, conditioning="prior")
        fitted["gapa_prior"] = (GapaMethod(gm, "gapa_prior", info), time.perf_counter() - t0)
    if "gapa_default" in gapa_names:
        t0 = time.perf_counter()
        gm, info = _fit_gapa(model, data, None, batch)
        fitted["gapa_default"] = (GapaMethod(gm, "gapa_default", info),
                                  time.perf_counter() - t0)
    return {n: fitted[n] for n in names if n in fitted}


METHODS = ("plain", "temperature", "mahalanobis", "knn", "lla_lastlayer", "gapa", "gapa_default",
           "gapa_prior", "gapa_block2")


def run_lm_benchmark(*, methods: Sequence[str] = METHODS, n_fit: int = 128, n_eval: int = 32,
                     length: int = 128, batch: int = 8, seed: int = 0,
                     log: Callable[[str], None] = _log) -> dict:
    """Run the benchmark; return its record (config, then one entry per method)."""
    from .language import smollm2

    torch.manual_seed(seed)
    model, tokenizer = smollm2(progress=True)
    data = lm_data(tokenizer, n_fit=n_fit, n_eval=n_eval, length=length, seed=seed)
    log(f"fit {tuple(data.fit.shape)}, val {tuple(data.val.shape)}, test "
        f"{tuple(data.test.shape)}, OOD {', '.join(data.ood)}")
    fitted = fit_methods(model, data, methods, batch, log)
    plain_seconds = evaluate(Plain(model), data.test, batch)[1]
    results = {}
    for name, (method, fit_seconds) in fitted.items():
        test, seconds, memory = evaluate(method, data.test, batch)
        ood = {k: evaluate(method, ids, batch)[0] for k, ids in data.ood.items()}
        results[name] = {
            "choice": _jsonable(method.choice), "fit_seconds": fit_seconds,
            "test_seconds": seconds, "test_time_ratio": seconds / plain_seconds,
            "test_peak_extra_mib": memory, "test": token_metrics(test),
            "ood": ood_metrics(test, ood),
        }
        m = results[name]["test"]
        log(f"{name:14s} NLL {m['nll']:.4f} ECE {m['ece']:.4f} time x{seconds / plain_seconds:.2f} "
            + " ".join(f"{k} {v['entropy']['auroc']:.3f}" for k, v in results[name]["ood"].items()))
    return {"kind": "language", "model": "SmolLM2-135M", "seed": seed, "n_fit": n_fit,
            "lengthscale_factors": list(LENGTHSCALE_FACTORS),
            "n_eval": n_eval, "length": length, "batch": batch, "held_out": HELD_OUT,
            "plain_test_seconds": plain_seconds, "methods": results}


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
