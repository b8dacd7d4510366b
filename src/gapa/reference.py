"""Slow references for the closed-form paths: Monte-Carlo propagation through the network."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .adapters import output_tensor
from .capture.hooks import call_sites
from .core import GAPA
from .errors import NotFittedError
from .moments import Moments
from .propagation.engine import thread_hooks


def monte_carlo_moments(
    gm: GAPA, x: torch.Tensor, n_samples: int, *, generator: torch.Generator
) -> Moments:
    """Return the output moments when every GAPA activation is *sampled* from its GP marginal.

    Each of the ``n_samples`` passes draws ``h = phi(z) + sqrt(v(z)) * eps`` independently per
    unit at every GAPA call site, ``z`` being that pass's own (already perturbed) pre-activation,
    and runs the rest of the network unchanged. The closed form of ``gm(x)`` must agree with these
    moments when variances are small (it is first order in them).

    Parameters
    ----------
    gm : GAPA
        A fitted GAPA.
    x : torch.Tensor
        Inputs; each row is repeated ``n_samples`` times in one forward pass.
    n_samples : int
        Samples per input.
    generator : torch.Generator
        Source of ``eps``, on torch's default device (normally the CPU); the noise is moved to
        the activations' device.

    Returns
    -------
    Moments
        The sample mean and variance of the model's output, per input.

    Raises
    ------
    NotFittedError
        When ``gm`` is not fitted.
    """
    return monte_carlo_trace(gm, x, n_samples, generator=generator, modules=False)[""]


def monte_carlo_trace(
    gm: GAPA, x: torch.Tensor, n_samples: int, *, generator: torch.Generator,
    modules: bool = True,
) -> dict[str, Moments]:
    """Return :func:`monte_carlo_moments` for every module's output, keyed as :meth:`GAPA.trace`.

    Parameters
    ----------
    gm : GAPA
        A fitted GAPA.
    x : torch.Tensor
        Inputs; each row is repeated ``n_samples`` times in one forward pass.
    n_samples : int
        Samples per input.
    generator : torch.Generator
        Source of the noise, as for :func:`monte_carlo_moments`.
    modules : bool, default True
        Whether to record every module's output; ``False`` keeps only the whole model's (``""``),
        whose memory is one output per sample instead of every activation per sample.

    Returns
    -------
    dict of str to Moments
        The sample moments of every tensor output with the batch axis, in the order the calls
        finish; the whole model is ``""``.

    Raises
    ------
    NotFittedError
        When ``gm`` is not fitted.
    """
    if not gm.is_fitted:
        raise NotFittedError("cannot sample: this GAPA is not fitted; call gm.fit(train_inputs)")
    reps = x.repeat_interleave(n_samples, dim=0) if x.shape[0] else x
    z_seen: dict[str, torch.Tensor] = {}
    outputs: list[tuple[str, torch.Tensor]] = []

    def on_call(key: str, z: torch.Tensor) -> None:
        z_seen[key] = z.detach().clone()

    def on_output(key: str, out: torch.Tensor) -> torch.Tensor:
        z = z_seen.pop(key)
        var = gm.site_variance(key, z)
        eps = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
        return out + var.sqrt() * eps

    # the recording hooks come after the sampling ones, so they see the sampled outputs
    with torch.no_grad(), call_sites(gm.model, gm.layers, on_call, on_output):
        if modules:
            with _recording(gm.model, outputs):
                gm.model(reps)
        else:
            outputs.append(("", gm.model(reps)))
    traced: dict[str, Moments] = {}
    for name, out in outputs:
        out = output_tensor(out) if name == "" else out
        if not isinstance(out, torch.Tensor) or out.shape[:1] != reps.shape[:1]:
            continue
        key, i = name, 0
        while key in traced:
            i += 1
            key = f"{name}#{i}"
        y = out.reshape(x.shape[0], n_samples, *out.shape[1:])
        traced[key] = Moments(y.mean(1), y.var(1))
    return traced


@contextlib.contextmanager
def _recording(model: torch.nn.Module, outputs: list) -> Iterator[None]:
    """Record ``(name, output)`` of every module call in this thread."""
    with thread_hooks() as add:
        for name, m in model.named_modules():
            add(m, lambda mod, args, out, name=name: outputs.append((name, out)))
        yield


def monte_carlo_propagate(
    fn, mean: torch.Tensor, var: torch.Tensor, n_samples: int, *, generator: torch.Generator,
    chunk: int = 1,
) -> Moments:
    """Return the moments of ``fn(x)`` for ``x ~ N(mean, diag(var))`` from ``n_samples`` draws.

    The slow reference of :func:`gapa.propagate` (exact for linear ``fn``, first order in
    ``var`` otherwise).

    Parameters
    ----------
    fn : callable
        The function, taking and returning tensors with a batch axis first.
    mean : torch.Tensor
        The input's mean.
    var : torch.Tensor
        The input's variance, of ``mean``'s shape.
    n_samples : int
        Draws.
    generator : torch.Generator
        Source of the draws, on torch's default device (normally the CPU); the noise is moved
        to ``mean``'s device.
    chunk : int, default 1
        Draws stacked along dim 0 into one call of ``fn``; ``chunk > 1`` needs an ``fn`` whose
        rows along dim 0 are independent (a batch), ``chunk=1`` suits any.

    Returns
    -------
    Moments
        The sample mean and variance of ``fn(x)``.
    """
    draws = []
    with torch.no_grad():
        for start in range(0, n_samples, chunk):
            c = min(chunk, n_samples - start)
            shape = (c, *mean.shape)
            eps = torch.randn(shape, generator=generator, dtype=mean.dtype).to(mean.device)
            x = (mean + var.sqrt() * eps).reshape(c * mean.shape[0], *mean.shape[1:])
            y = fn(x)
            draws.append(y.reshape(c, y.shape[0] // c, *y.shape[1:]))
    y = torch.cat(draws)
    return Moments(y.mean(0), y.var(0))
