"""Replay of the part of a forward pass that comes before the first GAPA layer.

A lengthscale search runs the same validation batches once per factor, and only the GP variance
changes between runs: every module that finishes before the first GAPA layer starts, and holds
none, computes the same outputs each time. :func:`replaying_prefix` records those outputs on a
batch's first run and returns copies of them on the later runs instead of computing them (for a
language model with GAPA in block 20 of 30, two thirds of the network). Only the calling thread
is affected; another thread's forward pass of the same model computes as usual.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..propagation.engine import thread_hooks, untracked


def _copy(out: Any) -> Any:
    """Return a copy of ``out`` whose tensors a later in-place write cannot reach back through."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


class _Recording:
    """The outputs of one batch's prefix modules, by (module name, call number)."""

    def __init__(self) -> None:
        self.outputs: dict[tuple[str, int], Any] = {}
        self.calls: dict[str, int] = {}


@contextlib.contextmanager
def replaying_prefix(
    model: nn.Module, layers: Sequence[str]
) -> Iterator[Callable[[Hashable, Callable[[], Any]], Any]]:
    """Yield ``run(key, fn)``: ``fn()`` (a forward pass of ``model``), its prefix replayed.

    The first ``run`` with a ``key`` records the outputs of the largest modules that finish
    before any of ``layers`` starts and contain none of them; later runs with the same key
    (the same inputs: the caller's promise) return copies of them without computing them.
    """
    owner = threading.get_ident()
    names = {m: name for name, m in model.named_modules()}
    blocked = {""} | {layer.rsplit(".", i)[0] for layer in layers
                      for i in range(1, layer.count(".") + 1)} | set(layers)
    recordings: dict[Hashable, _Recording] = {}
    state: dict[str, Any] = {"recording": None, "reached": False, "stack": []}
    patched: dict[nn.Module, Any] = {}

    def pre(module, args):
        state["stack"].append(names.get(module, ""))
        if names.get(module) in layers:
            state["reached"] = True

    def post(module, args, output):
        name = state["stack"].pop() if state["stack"] else names.get(module, "")
        rec = state["recording"]
        if rec is None or state["reached"] or name in blocked or module in patched:
            return
        call = rec.calls.get(name, 0)
        rec.calls[name] = call + 1
        # the largest module wins: a parent recorded after its children replaces them
        for key in [k for k in rec.outputs if k[0].startswith(name + ".")]:
            del rec.outputs[key]
        with untracked():
            rec.outputs[name, call] = _copy(output)

    def replay(name: str, rec: _Recording, original):
        def forward(*args, **kwargs):
            if threading.get_ident() != owner:
                return original(*args, **kwargs)
            call = rec.calls.get(name, 0)
            rec.calls[name] = call + 1
            out = rec.outputs.get((name, call))
            return original(*args, **kwargs) if out is None else _copy(out)
        return forward

    def run(key: Hashable, fn: Callable[[], Any]) -> Any:
        rec = recordings.get(key)
        if rec is None:  # record
            rec = recordings[key] = _Recording()
            state.update(recording=rec, reached=False, stack=[])
            try:
                with thread_hooks() as add:
                    for module in names:
                        add(module, pre, pre=True)
                        add(module, post)
                    return fn()
            finally:
                state["recording"] = None
        modules = {name: model.get_submodule(name) for name, _ in rec.outputs}
        rec.calls = {}
        for name, module in modules.items():
            original = module.__dict__.get("forward")
            patched[module] = original
            module.forward = replay(name, rec, original or type(module).forward.__get__(module))
        try:
            return fn()
        finally:
            for module, original in patched.items():
                if original is None:
                    del module.forward
                else:
                    module.forward = original
            patched.clear()

    yield run
