"""Hooks on the GAPA layers of a network.

They see each call's pre-activation and output, keyed by call site, in the calling thread only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import UnsupportedOperationError
from ..propagation.engine import thread_hooks


def site_key(layer: str, call: int) -> str:
    """Return the key of the ``call``-th call (0-based) of module ``layer`` in a forward pass.

    The first call's key is ``layer`` itself, a later one's ``layer#call``.
    """
    return layer if call == 0 else f"{layer}#{call}"


@contextlib.contextmanager
def call_sites(
    model: nn.Module, layers: Sequence[str],
    on_call: Callable[[str, torch.Tensor], None],
    on_output: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
) -> Iterator[None]:
    """Install hooks on the modules ``layers`` of ``model`` while the ``with`` block runs.

    The hooks act only in this thread: other threads' forward passes of the same model never
    reach them.

    Parameters
    ----------
    model : nn.Module
        The network; its call counts restart at each of its forward passes.
    layers : Sequence[str]
        Names of the submodules to hook.
    on_call : Callable[[str, Tensor], None]
        Called before each call with its key (which counts calls within one forward pass, see
        :func:`site_key`) and the module's first positional argument, the pre-activation.
    on_output : Callable[[str, Tensor], Tensor | None], optional
        Called after each call with its key and the module's output; a return value other than
        None replaces the output.
    """
    counts: dict[str, int] = {}
    with thread_hooks() as add:
        add(model, lambda mod, args: counts.clear(), pre=True)
        for name in layers:
            module = model.get_submodule(name)

            def pre(mod, args, name=name):
                call = counts.get(name, 0)
                counts[name] = call + 1
                on_call(site_key(name, call), args[0])

            def post(mod, args, output, name=name):
                if on_output is not None:
                    return on_output(site_key(name, counts[name] - 1), output)
                return None

            add(module, pre, pre=True)
            add(module, post)
        yield


def require_calls(keys: list[str], layers: list[str]) -> None:
    """Refuse a prediction pass in which no GAPA layer ran in the calling thread.

    It would report zero variance.
    """
    if not keys:
        raise UnsupportedOperationError(
            f"none of the GAPA layers {layers} ran in this thread during the forward pass. A "
            "model that runs its modules on other threads (nn.DataParallel, a thread pool) is "
            "not supported: GAPA follows only the calling thread's forward pass; run the "
            "forward in one thread (on several GPUs: one model and one GAPA per device)")
