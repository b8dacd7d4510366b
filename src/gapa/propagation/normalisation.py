"""Normalisation layers with their first-order diagonal, in O(d) per normalised slice.

Normalising couples every unit of a slice through its mean and scale, so the composition of the
elementwise rules (which would treat ``x`` and ``1 / sigma(x)`` as independent) is wrong here.
With ``xhat = (x - mu) / sigma`` and ``sigma = sqrt(var(x) + eps)``, layer norm has the Jacobian
``J = (g / sigma) (I - 1 1^T / d - xhat xhat^T / d)``, and RMS norm (``y = g x / r``,
``r = sqrt(mean(x^2) + eps)``) has ``J = (g / r) (I - x x^T / (d r^2))``. Expanding
``diag(J diag(v) J^T)`` needs only the sums ``S0 = sum v``, ``S1 = sum xhat v`` and
``S2 = sum xhat^2 v`` (``sum a^2 v`` for RMS norm) over the slice. Each diagonal is written as
(diagonal term) + (the off-diagonal sum, clamped at 0) so that rounding can't make it negative.

The scale ``sigma`` (``r``) is taken at its expected value under the input's uncertainty,
``E[mean(x^2)] = mean(mu^2 + v)`` (the sample variance likewise), not at the mean's: over
hundreds of units it concentrates there, and a normalised vector's norm is fixed, so the output
variance stays bounded however large ``v`` is. The linearisation at the mean's own scale grew
with ``v`` without bound (Monte Carlo agrees with this rule to 2% at ``v`` 100 times ``mu^2``).
As ``v -> 0`` both are the first-order diagonal.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .engine import Tensor, VarianceTracker, aliases, arg, module_rule, rule


def _work_dtype(t: Tensor) -> torch.dtype:
    """Return the dtype to normalise in: at least float32, as torch and transformers do."""
    return torch.promote_types(t.dtype, torch.float32)


def layer_norm_diag(x: Tensor, v: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    """Return ``diag(J diag(v) J^T)`` of layer norm over ``dims``, without its affine map.

    The map is ``(x - mean) / sqrt(var + eps)``, ``J`` its Jacobian at ``x`` with the scale at
    its expected value (see the module doc) and ``v`` the input's variance.
    """
    n = math.prod(x.shape[d] for d in dims)
    centred = x - x.mean(dims, keepdim=True)
    # the expected sample variance of the uncertain slice: E[var(x)] = var(mu) + (1 - 1/n) mean(v)
    sigma2 = (centred.square() + (1.0 - 1.0 / n) * v).mean(dims, keepdim=True) + eps
    xhat = centred / sigma2.sqrt()
    s0 = v.sum(dims, keepdim=True)
    s1 = (xhat * v).sum(dims, keepdim=True)
    s2 = (xhat.square() * v).sum(dims, keepdim=True)
    c = 1.0 + xhat.square()  # row i of n J sigma is n e_i - (1 + xhat_i xhat_j)_j
    off = (s0 + 2.0 * xhat * s1 + xhat.square() * s2 - c.square() * v).clamp_min(0.0)
    return ((1.0 - c / n).square() * v + off / n**2) / sigma2


def rms_norm_diag(x: Tensor, v: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    """Return ``diag(J diag(v) J^T)`` of RMS norm over ``dims``, without its gain.

    The map is ``x / sqrt(mean(x^2) + eps)``, ``J`` its Jacobian at ``x`` with the scale at its
    expected value (see the module doc) and ``v`` the input's variance.
    """
    n = math.prod(x.shape[d] for d in dims)
    r2 = (x.square() + v).mean(dims, keepdim=True) + eps  # E[mean(x^2)] = mean(mu^2 + v)
    a2 = x.square() / r2
    t = (a2 * v).sum(dims, keepdim=True)
    off = (a2 * (t - a2 * v)).clamp_min(0.0)
    return ((1.0 - a2 / n).square() * v + off / n**2) / r2


def _trailing(x: Tensor, normalized_shape) -> tuple[int, ...]:
    k = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return tuple(range(x.dim() - k, x.dim()))


def _check_affine(tr: VarianceTracker, name: str, *params: Any) -> None:
    if any(tr.var(p) is not None for p in params):
        raise tr.unsupported(f"{name} with an uncertain weight or bias")


def _scaled(var: Tensor, weight: Tensor | None, out: Tensor) -> Tensor:
    if weight is not None:
        var = var * weight.to(var.dtype).square()
    return var.to(out.dtype)


@rule(*aliases("layer_norm"))
def _layer_norm(tr: VarianceTracker, func, args, kwargs):
    """Layer norm's diagonal over the trailing ``normalized_shape`` dims (see the module doc)."""
    x = args[0]
    shape = arg(args, kwargs, 1, "normalized_shape")
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    eps = arg(args, kwargs, 4, "eps", 1e-5)
    _check_affine(tr, "layer_norm", weight, bias)
    out = func(*args, **kwargs)
    wd = _work_dtype(x)
    var = layer_norm_diag(x.to(wd), tr.var(x).to(wd), _trailing(x, shape), eps)
    return out, _scaled(var, weight, out)


@rule(*aliases("group_norm"))
def _group_norm(tr: VarianceTracker, func, args, kwargs):
    """Layer norm's diagonal within each group of channels, then the per-channel scale."""
    x = args[0]
    groups = arg(args, kwargs, 1, "num_groups")
    weight, bias = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    eps = arg(args, kwargs, 4, "eps", 1e-5)
    _check_affine(tr, "group_norm", weight, bias)
    out = func(*args, **kwargs)
    wd = _work_dtype(x)
    n, c = x.shape[0], x.shape[1]
    xg = x.to(wd).reshape(n, groups, -1)
    var = layer_norm_diag(xg, tr.var(x).to(wd).reshape(n, groups, -1), (-1,), eps)
    var = var.reshape(x.shape)
    if weight is not None:
        var = var * weight.to(wd).square().reshape(c, *([1] * (x.dim() - 2)))
    return out, var.to(out.dtype)


@rule(*aliases("rms_norm"))
def _rms_norm(tr: VarianceTracker, func, args, kwargs):
    """RMS norm's diagonal at its expected scale (see the module doc).

    ``eps=None`` is the machine epsilon of the computation dtype, as in torch.
    """
    x = args[0]
    shape = arg(args, kwargs, 1, "normalized_shape")
    weight = arg(args, kwargs, 2, "weight")
    eps = arg(args, kwargs, 3, "eps")
    _check_affine(tr, "rms_norm", weight)
    out = func(*args, **kwargs)
    wd = _work_dtype(x)
    eps = torch.finfo(wd).eps if eps is None else eps
    var = rms_norm_diag(x.to(wd), tr.var(x).to(wd), _trailing(x, shape), eps)
    return out, _scaled(var, weight, out)


# --- hand-written RMSNorm modules of transformers ------------------------------------------------
#
# Matched by class name (transformers stays optional). Every class below computes, over the last
# dim, in float32 (or wider): ``gain * x / sqrt(mean(x^2) + eps)``, cast back to the input dtype
# before or after the gain; the families differ only in the gain (``weight``; ``1 + weight`` for
# Gemma-style; none for the unweighted ones) and in the name of ``eps``. Gated and grouped
# variants, and norms of a transformed input, are left out. The rule also checks that the
# module's output matches this formula, so a same-named class of another shape raises.

RMS_NORM_WEIGHT = (
    "AXK1RMSNorm", "AXK2RMSNorm", "AfmoeRMSNorm", "Aimv2RMSNorm", "Apertus1p5TextRMSNorm",
    "ApertusRMSNorm", "ArceeRMSNorm", "AriaTextRMSNorm", "BailingHybridRMSNorm", "BambaRMSNorm",
    "BeamRMSNorm", "BitNetRMSNorm", "BltRMSNorm", "ChameleonRMSNorm", "ClvpRMSNorm",
    "Cohere2MoeRMSNorm", "Cosmos3EdgeTextRMSNorm", "CsmRMSNorm", "CwmRMSNorm",
    "DeepseekOcr2TextRMSNorm", "DeepseekOcr2VisionRMSNorm", "DeepseekV2RMSNorm",
    "DeepseekV32RMSNorm", "DeepseekV3RMSNorm", "DeepseekV4RMSNorm",
    "DeepseekV4UnweightedRMSNorm", "Deimv2RMSNorm", "DiaRMSNorm", "DiffLlamaRMSNorm",
    "DiffusionGemmaRMSNorm", "DogeRMSNorm", "Dots1RMSNorm", "Dots3NoteRMSNorm",
    "EmbeddingGemma2RMSNorm", "Emu3RMSNorm", "Ernie4_5RMSNorm", "Ernie4_5_MoeRMSNorm",
    "Ernie4_5_VLMoeRMSNorm", "EsmFold2RMSNorm", "EuroBertRMSNorm", "EvollaRMSNorm",
    "Exaone4RMSNorm", "Exaone4_5_RMSNorm", "ExaoneMoeRMSNorm", "FalconH1RMSNorm",
    "FalconMambaRMSNorm", "FalconMambaWeightlessRMSNorm", "FlexOlmoRMSNorm", "FlintRMSNorm",
    "Gemma3nRMSNorm", "Gemma4RMSNorm", "Gemma4UnifiedRMSNorm", "Glm4MoeLiteRMSNorm",
    "Glm4MoeRMSNorm", "Glm4RMSNorm", "Glm4vMoeRMSNorm", "Glm4vMoeTextRMSNorm", "Glm4vRMSNorm",
    "Glm5NextRMSNorm", "Glm5NextTextRMSNorm", "Glm5NextTextUnweightedRMSNorm",
    "GlmImageRMSNorm", "GlmMoeDsaRMSNorm", "GlmOcrRMSNorm", "GlmRMSNorm", "GptOssRMSNorm",
    "Granite4VisionTextRMSNorm", "GraniteDoclingTextRMSNorm", "GraniteMoeHybridRMSNorm",
    "GraniteMoeRMSNorm", "GraniteMoeSWARMSNorm", "GraniteMoeSharedRMSNorm", "GraniteRMSNorm",
    "GraniteSWARMSNorm", "HYV3RMSNorm", "HYV4RMSNorm", "HYV4VLRMSNorm", "HeliumRMSNorm",
    "HiggsAudioV2RMSNorm", "HrmTextRMSNorm", "HunYuanDenseV1RMSNorm", "HunYuanMoEV1RMSNorm",
    "HunYuanVLRMSNorm", "HyperCLOVAXRMSNorm", "Idefics2RMSNorm", "Idefics3RMSNorm",
    "IdeficsRMSNorm", "Inkling2LoopRMSNorm", "Inkling2LoopUnweightedRMSNorm", "Inkling2RMSNorm",
    "Inkling2UnweightedRMSNorm", "InklingRMSNorm", "InternVLVisionRMSNorm", "JambaRMSNorm",
    "JetMoeRMSNorm", "KimiLinearRMSNorm", "Kolibri1RMSNorm", "KyutaiSpeechToTextRMSNorm",
    "LagunaRMSNorm", "LaraMiniRMSNorm", "Lfm2MoeRMSNorm", "Lfm2RMSNorm", "Lfm3RMSNorm",
    "Lfm3VlVisionRMSNorm", "LightOnOcrRMSNorm", "Llama4TextRMSNorm", "LlamaRMSNorm",
    "LongcatFlashRMSNorm", "Mamba2RMSNorm", "MambaRMSNorm", "MellumRMSNorm",
    "MiMoV2FlashRMSNorm", "MiniCPM3RMSNorm", "MiniMaxM2RMSNorm", "MiniMaxRMSNorm",
    "Ministral3RMSNorm", "MinistralRMSNorm", "Mistral3RMSNorm", "Mistral4RMSNorm",
    "MistralLarge4RMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "MllamaTextRMSNorm",
    "Molmo2RMSNorm", "MoshiRMSNorm", "MuseGlimmerAssistantRMSNorm", "MuseGlimmerRMSNorm",
    "MuseSparkRMSNorm", "NanoChatRMSNorm", "NemotronHRMSNorm", "NemotronH_Omni_RMSNorm",
    "NeoMMERMSNorm", "NeuCodecRMSNorm", "Olmo2RMSNorm", "Olmo3RMSNorm", "OlmoHybridRMSNorm",
    "OlmoeRMSNorm", "OpenAIPrivacyFilterRMSNorm", "Ovis2RMSNorm", "PaddleOCRRMSNorm",
    "PeAudioEncoderRMSNorm", "PeAudioVideoEncoderRMSNorm", "PeVideoEncoderRMSNorm",
    "Phi3RMSNorm", "Phi4MultimodalRMSNorm", "PixtralRMSNorm", "QianfanOCRVisionRMSNorm",
    "Qwen2MoeRMSNorm", "Qwen2RMSNorm", "Qwen2VLRMSNorm", "Qwen2_5OmniRMSNorm",
    "Qwen2_5_VLRMSNorm", "Qwen3MoeRMSNorm", "Qwen3OmniMoeCode2WavRMSNorm", "Qwen3OmniMoeRMSNorm",
    "Qwen3OmniMoeTextRMSNorm", "Qwen3OmniMoeThinkerTextRMSNorm", "Qwen3RMSNorm",
    "Qwen3VLMoeTextRMSNorm", "Qwen3VLTextRMSNorm", "Sapiens2RMSNorm", "SeedOssRMSNorm",
    "SmolLM3RMSNorm", "SolarOpenRMSNorm", "TimesFm2_5RMSNorm", "TimesFmRMSNorm",
    "UltraVBertRMSNorm", "UltrabertRMSNorm", "UnlimitedOcrTextRMSNorm",
    "VibeVoiceAcousticTokenizerRMSNorm", "VibeVoiceAsrRMSNorm", "VibeVoiceRMSNorm",
    "VoxtralRealtimeRMSNorm", "Xcodec2RMSNorm", "YoutuRMSNorm", "Zamba2RMSNorm", "ZambaRMSNorm",
    "ZayaRMSNorm",
)
#: Rows of each call (evenly spaced) on which an RMS-norm module is checked against the formula.
_CHECKED_ROWS = 16

RMS_NORM_ONE_PLUS_WEIGHT = (
    "Gemma2RMSNorm", "Gemma3RMSNorm", "GemmaRMSNorm", "MiniMaxM3VLRMSNorm",
    "MuseGlimmerTextCenteredRMSNorm", "MuseSparkTextCenteredRMSNorm", "Qwen3NextRMSNorm",
    "Qwen3_5MoeRMSNorm", "Qwen3_5RMSNorm", "RecurrentGemmaRMSNorm", "Step3p7RMSNorm",
    "T5Gemma2RMSNorm", "T5GemmaRMSNorm", "VaultGemmaRMSNorm",
)


def _module_eps(tr: VarianceTracker, module) -> float:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, int | float):
            return float(eps)
    raise tr.unsupported(f"{type(module).__name__} without a numeric eps / variance_epsilon")


def _rms_module_rule(one_plus: bool):
    def apply(tr: VarianceTracker, module, args, out):
        x = args[0]
        if tr.var(x) is None or not isinstance(out, Tensor) or out.shape != x.shape:
            raise tr.unsupported(
                f"{type(module).__name__} other than one uncertain input to one output tensor")
        wd = _work_dtype(x)
        eps = _module_eps(tr, module)
        weight = getattr(module, "weight", None)
        gain = torch.ones((), dtype=wd, device=x.device)
        if isinstance(weight, Tensor):
            gain = weight.to(wd) + 1.0 if one_plus else weight.to(wd)
        xw = x.to(wd)
        # The formula is the module's, not the input's: a few rows identify it at a fraction
        # of the cost of recomputing the norm of every row on every call.
        flat = xw.reshape(-1, xw.shape[-1])
        pick = torch.linspace(0, len(flat) - 1, min(len(flat), _CHECKED_ROWS),
                              device=x.device).round().long()
        rows = flat[pick]
        expected = gain * rows * torch.rsqrt(rows.square().mean(-1, keepdim=True) + eps)
        # The module computes in float32 (even for float64 inputs) and rounds to the input and
        # output dtypes at most twice; a different formula is off by far more.
        tol = 8 * max(torch.finfo(t).eps for t in (x.dtype, out.dtype, torch.float32))
        got = out.reshape(-1, out.shape[-1])[pick].to(wd)
        if not torch.allclose(got, expected, rtol=tol,
                              atol=tol * float(expected.abs().max().clamp_min(1e-30))):
            raise tr.unsupported(
                f"{type(module).__name__} (its output does not match the RMSNorm formula "
                f"{'(1 + weight)' if one_plus else 'weight'} * x / sqrt(mean(x^2) + eps))"
            )
        var = rms_norm_diag(xw, tr.var(x).to(wd), (-1,), eps) * gain.square()
        return var.to(out.dtype)

    return apply


module_rule(*RMS_NORM_WEIGHT)(_rms_module_rule(one_plus=False))
module_rule(*RMS_NORM_ONE_PLUS_WEIGHT)(_rms_module_rule(one_plus=True))
