"""Does the model fit the GPUs? Weights plus KV cache for the configured context, against GPU memory.

Pure arithmetic over two small tables (model architectures, GPU memory); no SkyPilot import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mistral_deploy.errors import FitError
from mistral_deploy.recipe import Architecture, GpuRequest, Recipe

GIB = 1024**3

# Mistral 7B v0.1 and v0.2 (Instruct v0.2 is the v0.1 architecture): 7.24 B parameters, vocab 32000.
_MISTRAL_7B = Architecture(params_b=7.24, layers=32, kv_heads=8, head_dim=128, hidden=4096, vocab=32000)

# Architectures of the models the built-in recipes use (from each model's config.json).
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.3": Architecture(params_b=7.25, layers=32, kv_heads=8, head_dim=128,
                                                       hidden=4096, vocab=32768),
    # 4-bit quantizations of Mistral 7B Instruct v0.2
    "TheBloke/Mistral-7B-Instruct-v0.2-AWQ": _MISTRAL_7B,
    "TheBloke/Mistral-7B-Instruct-v0.2-GPTQ": _MISTRAL_7B,
    "mistralai/Mixtral-8x7B-Instruct-v0.1": Architecture(params_b=46.7, layers=32, kv_heads=8, head_dim=128,
                                                         hidden=4096, vocab=32000),
    "mistralai/Mistral-Nemo-Instruct-2407": Architecture(params_b=12.2, layers=40, kv_heads=8, head_dim=128,
                                                         hidden=5120, vocab=131072),
    "mistralai/Mistral-Small-24B-Instruct-2501": Architecture(params_b=23.6, layers=40, kv_heads=8, head_dim=128,
                                                              hidden=5120, vocab=131072),
    "mistralai/Codestral-22B-v0.1": Architecture(params_b=22.2, layers=56, kv_heads=8, head_dim=128, hidden=6144,
                                                 vocab=32768),
    # the tiny random-weight model the local backend builds (see templates/build_tiny_model.py)
    "builtin:tiny-mistral": Architecture(params_b=0.0006, layers=2, kv_heads=2, head_dim=32),
}

# GPU memory in GiB, per device, as SkyPilot names the accelerators.
GPU_MEMORY_GIB: dict[str, float] = {
    "T4": 15, "V100": 16, "V100-32GB": 32, "A10": 24, "A10G": 22.5, "L4": 22.5, "L40": 45, "L40S": 45,
    "A40": 48, "RTX6000": 24, "RTXA6000": 48, "A100": 40, "A100-80GB": 80, "H100": 80, "H100-MEGA": 80,
    "H200": 141, "B200": 180, "GH200": 96, "MI300X": 192,
}


@dataclass(frozen=True)
class QuantFormat:
    """How a quantization stores a linear layer's weights: `bits` per weight, plus, per `group` weights,
    a scale of `scale_bits` and a zero point of `zero_bits` (packed)."""

    bits: int
    group: int = 0  # 0: no per-group data worth counting (per-tensor or per-channel scales)
    scale_bits: int = 0
    zero_bits: int = 0

    @property
    def bytes_per_weight(self) -> float:
        extra = (self.scale_bits + self.zero_bits) / self.group if self.group else 0.0
        return (self.bits + extra) / 8


_AWQ = QuantFormat(bits=4, group=128, scale_bits=16, zero_bits=4)  # AutoAWQ's GEMM format, the usual w4 g128
_GPTQ = QuantFormat(bits=4, group=128, scale_bits=16, zero_bits=4)  # the usual 4-bit, group size 128
_FP8 = QuantFormat(bits=8)
# What each --quantization value stores (the common case of each); a method missing here (its width is
# in the checkpoint's own config: compressed-tensors, quark, torchao...) is counted unquantized, the
# safe side.
QUANT_FORMATS: dict[str, QuantFormat] = {
    "awq": _AWQ, "auto_awq": _AWQ, "awq_marlin": _AWQ,
    "gptq": _GPTQ, "auto_gptq": _GPTQ, "gptq_marlin": _GPTQ,
    "fp8": _FP8, "fbgemm_fp8": _FP8, "fp8_per_tensor": _FP8, "fp8_per_channel": _FP8, "deepseek_v4_fp8": _FP8,
    "fp8_per_block": QuantFormat(bits=8, group=128 * 128, scale_bits=32),
    "int8_per_channel_weight_only": QuantFormat(bits=8), "experts_int8": QuantFormat(bits=8),
    "mxfp8": QuantFormat(bits=8, group=32, scale_bits=8), "modelopt_mxfp8": QuantFormat(bits=8, group=32, scale_bits=8),
    "mxfp4": QuantFormat(bits=4, group=32, scale_bits=8), "gpt_oss_mxfp4": QuantFormat(bits=4, group=32, scale_bits=8),
    "modelopt_fp4": QuantFormat(bits=4, group=16, scale_bits=8), "nvfp4_per_token": QuantFormat(bits=4, group=16,
                                                                                               scale_bits=8),
}
_DTYPE_BYTES = {"auto": 2.0, "bfloat16": 2.0, "float16": 2.0, "float32": 4.0}


def weights_bytes(model_dtype: str, quantization: Optional[str], arch: Architecture) -> float:
    """What the weights take in GPU memory: the quantized linear layers at their format's size, the rest
    (token embeddings and output head, norms) at the model's dtype."""
    params = arch.params_b * 1e9
    dtype_bytes = _DTYPE_BYTES[model_dtype]
    fmt = QUANT_FORMATS.get(quantization or "")
    if fmt is None:
        return params * dtype_bytes
    kept = 2 * arch.vocab * arch.hidden if arch.vocab and arch.hidden else 0
    return kept * dtype_bytes + (params - kept) * fmt.bytes_per_weight


# CUDA context, activations and the sampler's buffers, per GPU.
_OVERHEAD_GIB = 1.5
# Suggestions, from smallest to largest: the first that fits is proposed.
_SUGGEST = ["L4:1", "A10G:1", "L40S:1", "A100:1", "A100-80GB:1", "H100:1", "A10G:4", "L40S:2",
            "A100:2", "A100-80GB:2", "H100:2", "A100-80GB:4", "H100:4", "H100:8"]


@dataclass(frozen=True)
class FitEstimate:
    gpu: GpuRequest
    weights_gib: float
    kv_cache_gib: float
    overhead_gib: float
    usable_gib: float  # all GPUs together, after gpu_memory_utilization
    context_tokens: int

    @property
    def needed_gib(self) -> float:
        return self.weights_gib + self.kv_cache_gib + self.overhead_gib

    @property
    def fits(self) -> bool:
        return self.needed_gib <= self.usable_gib

    def summary(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit"
        return (
            f"{self.gpu}: {verdict}: weights {self.weights_gib:.1f} GiB + KV cache {self.kv_cache_gib:.1f} GiB "
            f"({self.context_tokens} tokens) + overhead {self.overhead_gib:.1f} GiB = {self.needed_gib:.1f} GiB "
            f"of {self.usable_gib:.1f} GiB usable"
        )


def architecture_of(recipe: Recipe) -> Optional[Architecture]:
    return recipe.model.architecture or KNOWN_ARCHITECTURES.get(recipe.model.id)


def estimate(recipe: Recipe, gpu: GpuRequest, arch: Architecture) -> Optional[FitEstimate]:
    memory = GPU_MEMORY_GIB.get(gpu.name)
    if memory is None:
        return None
    model = recipe.model
    kv_bytes = _kv_dtype_bytes(model.vllm_args)
    context = model.max_model_len or 32768
    weights = weights_bytes(model.dtype, model.quantization, arch) / GIB
    # K and V, per layer, per KV head (GQA shares them across query heads), per token of context
    kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * kv_bytes * context / GIB
    usable = memory * gpu.count * recipe.engine.gpu_memory_utilization
    return FitEstimate(gpu, weights, kv, _OVERHEAD_GIB * gpu.count, usable, context)


def _kv_dtype_bytes(args: list[str]) -> float:
    return 1.0 if "--kv-cache-dtype=fp8" in args or _has_pair(args, "--kv-cache-dtype", "fp8") else 2.0


def _has_pair(args: list[str], flag: str, value: str) -> bool:
    return any(a == flag and b == value for a, b in zip(args, args[1:]))


def check_fit(recipe: Recipe) -> list[FitEstimate]:
    """Estimates for each GPU candidate; raises FitError when none of them fits."""
    arch = architecture_of(recipe)
    if arch is None or not recipe.resources.gpu:
        return []
    estimates = [e for e in (estimate(recipe, gpu, arch) for gpu in recipe.resources.gpu) if e is not None]
    if estimates and not any(e.fits for e in estimates):
        worst = estimates[0]
        would_fit = _suggestion(recipe, arch)
        hint = f"; would fit: {would_fit} (--gpu {would_fit})" if would_fit else ""
        raise FitError(
            f"{recipe.model.id} does not fit {worst.gpu}: needs about {worst.needed_gib:.0f} GiB "
            f"(weights {worst.weights_gib:.0f} + KV cache {worst.kv_cache_gib:.1f} for {worst.context_tokens} tokens), "
            f"{worst.usable_gib:.0f} GiB usable{hint}"
        )
    return estimates


def _suggestion(recipe: Recipe, arch: Architecture) -> Optional[str]:
    for text in _SUGGEST:
        name, count = text.split(":")
        est = estimate(recipe, GpuRequest(name=name, count=int(count)), arch)
        if est is not None and est.fits:
            return text
    return None


# Memory bandwidth per GPU, GB/s, from NVIDIA's datasheets (the SXM parts where a cloud rents both).
GPU_BANDWIDTH_GBPS: dict[str, float] = {
    "T4": 320, "V100": 900, "V100-32GB": 900, "A10": 600, "A10G": 600, "L4": 300, "L40": 864, "L40S": 864,
    "A40": 696, "A100": 1555, "A100-80GB": 2039, "H100": 3350, "H200": 4800,
}
# The workload the estimate is made for: requests in flight, and tokens of context each holds.
ESTIMATE_CONCURRENCY, ESTIMATE_CONTEXT = 16, 1024
ESTIMATE_SOURCE = (f"upper bound: decoding {ESTIMATE_CONCURRENCY} requests of {ESTIMATE_CONTEXT} tokens, each step "
                   "reads the weights and their KV cache once at the GPU's datasheet memory bandwidth; "
                   "measure yours with `mistral-deploy bench`")


def decode_ceiling(recipe: Recipe, gpu: GpuRequest) -> Optional[float]:
    """Output tokens/s the GPUs cannot exceed for this model (decode is memory-bound): an estimate from
    the datasheet bandwidth, never a measurement; None for an unknown model or GPU."""
    arch = architecture_of(recipe)
    bandwidth = GPU_BANDWIDTH_GBPS.get(gpu.name)
    if arch is None or bandwidth is None:
        return None
    kv_bytes = 2 * arch.layers * arch.kv_heads * arch.head_dim * _kv_dtype_bytes(recipe.model.vllm_args)
    step_bytes = (weights_bytes(recipe.model.dtype, recipe.model.quantization, arch)
                  + ESTIMATE_CONCURRENCY * ESTIMATE_CONTEXT * kv_bytes)
    return ESTIMATE_CONCURRENCY * bandwidth * 1e9 * gpu.count / step_bytes
