"""Matrix products, softmax and scaled dot-product attention.

A product with one uncertain operand is linear in it: ``Var(A B) = Var(A) @ B^2`` exactly. With
two uncertain operands the rules assume the operands' entries independent: then
``Var(A B) = VA @ B^2 + A^2 @ VB + VA @ VB`` exactly (each output entry is a sum of products of
distinct independent entries). In attention, queries, keys and values are computed from the same
hidden states, so this is an approximation there, as is every diagonal of correlated units.

Softmax and log-softmax use their exact first-order diagonal in O(d): with ``p = softmax(x)``,
``J = diag(p) - p p^T`` gives ``p_i^2 [(1 - p_i)^2 v_i + sum_{j != i} p_j^2 v_j]``, and
``J = I - 1 p^T`` (log-softmax) gives ``(1 - p_i)^2 v_i + sum_{j != i} p_j^2 v_j``.

Softmax outputs are bounded, their linearisation is not: deep in a transformer, where the
propagated variance is as large as the activations themselves, first order overflowed (every
logit variance NaN from GAPA at the second block of SmolLM2). So softmax is saturated at the
Bernoulli bound ``p (1 - p)``, and attention is handled as a whole: values centred on the
output, keys centred per query, an expected slope and a Jensen bound (see
:func:`attention_scores_var`). Each is first order as the variance vanishes (tested against the
float64 Jacobian there) and is tested against Monte Carlo at large variances.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .engine import Tensor, VarianceTracker, aliases, arg, rule


def product_var(
    product: Callable[[Tensor, Tensor], Tensor], a: Tensor, va: Tensor | None, b: Tensor,
    vb: Tensor | None,
) -> Tensor:
    """Return the variance of the bilinear ``product(a, b)`` for independent operands.

    Parameters
    ----------
    product : callable
        The bilinear map, e.g. ``torch.matmul``.
    a, b : Tensor
        The operands' means.
    va, vb : Tensor or None
        Their variances; None for a constant operand.

    Returns
    -------
    Tensor or None
        ``product(va, b^2) + product(a^2, vb) + product(va, vb)``, without the terms of a
        constant operand; None when both are constant.
    """
    var = None
    if va is not None:
        var = product(va, b.square())
    if vb is not None:
        term = product(a.square(), vb)
        var = term if var is None else var + term
    if va is not None and vb is not None:
        var = var + product(va, vb)
    return var


@rule(*aliases("matmul", "mm", "bmm"), Tensor.__matmul__, Tensor.__rmatmul__)
def _matmul(tr: VarianceTracker, func, args, kwargs):
    """Exact for an uncertain times a constant operand; independent operands otherwise."""
    a, b = args[0], arg(args, kwargs, 1, "other", kwargs.get("mat2"))
    kw = {k: val for k, val in kwargs.items() if k not in ("other", "mat2", "out")}
    out = func(*args, **kwargs)
    var = product_var(lambda x, y: func(x, y, **kw), a, tr.var(a), b, tr.var(b))
    return out, var


@rule(torch.addmm, Tensor.addmm, torch.baddbmm, Tensor.baddbmm)
def _addmm(tr: VarianceTracker, func, args, kwargs):
    """``beta * input + alpha * (m1 @ m2)``: ``beta^2 V_input + alpha^2 Var(m1 @ m2)``."""
    if "out" in kwargs:
        raise tr.unsupported(f"{func.__name__} with out=")
    base, m1, m2 = args[0], arg(args, kwargs, 1, "mat1"), arg(args, kwargs, 2, "mat2")
    if m1 is None:
        m1, m2 = arg(args, kwargs, 1, "batch1"), arg(args, kwargs, 2, "batch2")
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    out = func(*args, **kwargs)
    product = torch.mm if m1.dim() == 2 else torch.bmm
    var = product_var(product, m1, tr.var(m1), m2, tr.var(m2))
    var = torch.zeros_like(out) if var is None else alpha**2 * var
    if tr.var(base) is not None and beta != 0:
        var = var + beta**2 * tr.var(base)
    return out, var


def _einsum_reduce(sub: str, keep: set[str]) -> str:
    """Return the subscripts of ``sub`` to keep.

    Those are the letters shared with the other operand or the output, each once (a repeated
    letter takes the diagonal), after any ellipsis.
    """
    reduced = "..." if "..." in sub else ""
    for ch in sub.replace("...", ""):
        if ch in keep and ch not in reduced:
            reduced += ch
    return reduced


@rule(torch.einsum)
def _einsum(tr: VarianceTracker, func, args, kwargs):
    """One or two operands, given as ``einsum("eq", a[, b])``.

    One operand: einsum is linear and each output entry sums distinct input entries, so the same
    einsum of the variance is exact. Two: each operand is first summed over the letters that
    neither the other operand nor the output has (exact, linear), after which every term of an
    output entry multiplies distinct entries of both, and the independent-operand product rule is
    exact. With two operands, an ellipsis must be kept in the output.
    """
    eq, ops = args[0], args[1:]
    if len(ops) == 1 and isinstance(ops[0], list | tuple):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or len(ops) not in (1, 2) or kwargs:
        raise tr.unsupported("torch.einsum other than einsum('equation', a) or (..., a, b)")
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    subs = lhs.split(",")
    if not arrow:  # implicit output: the letters seen once, sorted, after any ellipsis
        letters = lhs.replace("...", "").replace(",", "")
        rhs = ("..." if "..." in lhs else "") + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(ops) == 1:
        return func(*args, **kwargs), torch.einsum(eq, tr.var(ops[0]))
    if "..." in lhs and "..." not in rhs:
        raise tr.unsupported("torch.einsum of two operands summing over an ellipsis")
    out = func(*args, **kwargs)
    a, b = ops
    keep_a = _einsum_reduce(subs[0], set(subs[1]) | set(rhs))
    keep_b = _einsum_reduce(subs[1], set(subs[0]) | set(rhs))
    va, vb = tr.var(a), tr.var(b)
    if keep_a != subs[0]:
        a = torch.einsum(f"{subs[0]}->{keep_a}", a)
        va = None if va is None else torch.einsum(f"{subs[0]}->{keep_a}", va)
    if keep_b != subs[1]:
        b = torch.einsum(f"{subs[1]}->{keep_b}", b)
        vb = None if vb is None else torch.einsum(f"{subs[1]}->{keep_b}", vb)
    reduced = f"{keep_a},{keep_b}->{rhs}"
    return out, product_var(lambda x, y: torch.einsum(reduced, x, y), a, va, b, vb)


# --- softmax -------------------------------------------------------------------------------------


def _softmax_dim(args, kwargs, x: Tensor) -> int:
    dim = arg(args, kwargs, 1, "dim")
    if dim is None:  # the deprecated implicit dim of F.softmax
        dim = 0 if x.dim() in (0, 1, 3) else 1
    return dim


def softmax_var(p: Tensor, v: Tensor, dim: int) -> Tensor:
    """Return the exact first-order diagonal variance of softmax at output ``p``.

    Parameters
    ----------
    p : Tensor
        The softmax output.
    v : Tensor
        The input's variance.
    dim : int
        The softmax dim.
    """
    p2 = p.square()
    off = ((p2 * v).sum(dim, keepdim=True) - p2 * v).clamp_min(0.0)
    return p2 * ((1.0 - p).square() * v + off)


def log_softmax_var(p: Tensor, v: Tensor, dim: int) -> Tensor:
    """Return the exact first-order diagonal variance of log-softmax.

    Parameters
    ----------
    p : Tensor
        The softmax output (not the log-softmax).
    v : Tensor
        The input's variance.
    dim : int
        The softmax dim.
    """
    p2 = p.square()
    off = ((p2 * v).sum(dim, keepdim=True) - p2 * v).clamp_min(0.0)
    return (1.0 - p).square() * v + off


def saturate(linear: Tensor, bound: Tensor) -> Tensor:
    """Return ``linear * bound / (linear + bound)``: the first-order variance where it is small.

    It is the first-order variance ``linear`` to relative order ``linear / bound``, and never more
    than the variance ``bound`` that the operation's range allows, which it approaches when the
    input's uncertainty swamps the linearisation (0 where both are 0).
    """
    total = linear + bound
    return torch.where(total > 0, linear * bound / total.where(total > 0, 1.0), 0.0)


def saturated_softmax_var(p: Tensor, v: Tensor, dim: int) -> Tensor:
    """Return the first-order variance of softmax, saturated at the Bernoulli bound ``p (1 - p)``.

    A softmax output lies in [0, 1], so its variance is at most ``E[p] (1 - E[p])``; the
    linearisation alone grows without bound in the input's variance.
    """
    return saturate(softmax_var(p, v, dim), p * (1.0 - p))


def attention_scores_var(scores: Tensor, p: Tensor, v_scores: Tensor, values: Tensor) -> Tensor:
    """Return the variance that uncertain scores give ``softmax(scores) @ values``.

    First order, ``d out / d s_j = p_j (values_j - out)``: the values are centred on the output,
    which the softmax rule followed by the product rule cannot do (the weights sum to one, so a
    shift of all values moves nothing). The slope is the expected one (statistical
    linearisation): each score, centred on the row's mean, is shrunk by
    ``1 / sqrt(1 + pi v / 8)`` as in the probit approximation, so a softmax saturated at the mean
    still moves when noise can change its winner. The result is saturated at
    ``sum_j E[p_j] (values_j - out)^2``, the most that a convex combination of the values can vary
    (Jensen). As ``v -> 0`` it is the first-order diagonal.
    """
    shrink = torch.rsqrt(1.0 + (math.pi / 8.0) * v_scores)
    centred = scores - (p * scores.nan_to_num(0.0, neginf=0.0)).sum(-1, keepdim=True)
    p = torch.softmax(centred * shrink, -1).nan_to_num(0.0)
    w = p.square() * shrink.square() * v_scores
    out = torch.matmul(p, values)
    values2 = values.square()
    linear = (torch.matmul(w, values2) - 2.0 * out * torch.matmul(w, values)
              + w.sum(-1, keepdim=True) * out.square()).clamp_min(0.0)
    bound = (torch.matmul(p, values2) - out.square()).clamp_min(0.0)
    return saturate(linear, bound)


@rule(*aliases("softmax"))
def _softmax(tr: VarianceTracker, func, args, kwargs):
    x = args[0]
    out = func(*args, **kwargs)
    dim = _softmax_dim(args, kwargs, x)
    return out, saturated_softmax_var(out, tr.var(x).to(out.dtype), dim)


@rule(*aliases("log_softmax"))
def _log_softmax(tr: VarianceTracker, func, args, kwargs):
    x = args[0]
    out = func(*args, **kwargs)
    dim = _softmax_dim(args, kwargs, x)
    return out, log_softmax_var(out.exp(), tr.var(x).to(out.dtype), dim)


# --- scaled dot-product attention ----------------------------------------------------------------


def _scores_var(p: Tensor, q: Tensor, vq: Tensor | None, k: Tensor,
                vk: Tensor | None) -> Tensor | None:
    """Return the variance of the scores ``q k^T``, with each query's keys centred.

    Softmax ignores a shift common to a row's scores, so a query's noise moves the weights only
    through the keys' differences: its keys are centred on their mean under that row's weights,
    ``kbar_i = sum_j p_ij k_j``, before the product rule. Without the centring, a component that
    all keys share (large in trained transformers) counts as independent noise per score.
    """
    var = None
    if vq is not None:  # sum_d vq_id (k_jd - kbar_id)^2, without forming the centred keys
        kbar = torch.matmul(p, k)
        kt = k.transpose(-2, -1)
        var = (torch.matmul(vq, kt.square()) - 2.0 * torch.matmul(vq * kbar, kt)
               + (vq * kbar.square()).sum(-1, keepdim=True)).clamp_min(0.0)
    if vk is not None:
        vkt = vk.transpose(-2, -1)
        term = torch.matmul(q.square(), vkt)
        if vq is not None:
            term = term + torch.matmul(vq, vkt)
        var = term if var is None else var + term
    return var


@rule(F.scaled_dot_product_attention)
def _sdpa(tr: VarianceTracker, func, args, kwargs):
    """Attention ``softmax(Q K^T * scale + mask) V`` as one operation.

    The output is the real (fused) function's. Values: ``p^2 @ VV``, exact for independent
    values. Scores: the independent-operand product rule with each query's keys centred
    (:func:`_scores_var`), carried to the output by :func:`attention_scores_var`. Both:
    ``Var(p) @ VV`` with the saturated softmax variance. Uncertain keys or values alone give the
    first-order diagonal as the variance vanishes; uncertain queries drop the correlation that
    centring leaves (measured against the Jacobian in the tests).
    """
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
             "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    q, k, val, mask, dropout_p, is_causal, scale, gqa = (
        arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(zip(names, defaults, strict=True)))
    if dropout_p:
        raise tr.unsupported("scaled_dot_product_attention with dropout_p > 0")
    if tr.var(mask) is not None:
        raise tr.unsupported("scaled_dot_product_attention with an uncertain attn_mask")
    out = func(*args, **kwargs)
    wd = torch.promote_types(out.dtype, torch.float32)
    vq, vk, vv = (None if tr.var(t) is None else tr.var(t).to(wd) for t in (q, k, val))
    q, k, val = q.to(wd), k.to(wd), val.to(wd)
    if gqa and k.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, val = k.repeat_interleave(rep, -3), val.repeat_interleave(rep, -3)
        vk = None if vk is None else vk.repeat_interleave(rep, -3)
        vv = None if vv is None else vv.repeat_interleave(rep, -3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kt = k.transpose(-2, -1)
    scores = torch.matmul(q, kt) * scale
    if is_causal:
        length, source = q.shape[-2], k.shape[-2]
        causal = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask.to(wd))
    p = torch.softmax(scores, -1).nan_to_num(0.0)  # a fully masked row attends to nothing
    var = torch.zeros_like(out, dtype=wd) if vv is None else torch.matmul(p.square(), vv)
    v_scores = _scores_var(p, q, vq, k, vk)
    if v_scores is not None:
        v_scores = scale**2 * v_scores
        var = var + attention_scores_var(scores, p, v_scores, val)
        if vv is not None:
            var = var + torch.matmul(saturated_softmax_var(p, v_scores, -1), vv)
    return out, var.to(out.dtype)
