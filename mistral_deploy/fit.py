"""Does the model fit the GPUs? Weights plus KV cache for the configured context, against GPU memory.

Pure arithmetic over two small tables (model architectures, GPU memory); no SkyPilot import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mistral_deploy.errors import FitError
from mistral_deploy.recipe import Architecture, GpuRequest, Recipe

GIB = 1024**3

# Architectures of the models the built-in recipes use (from each model's config.json).
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    "mistralai/Mistral-7B-v0.1": Architecture(params_b=7.24, layers=32, kv_heads=8, head_dim=128),
    "mistralai/Mistral-7B-Instruct-v0.3": Architecture(params_b=7.25, layers=32, kv_heads=8, head_dim=128),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": Architecture(params_b=46.7, layers=32, kv_heads=8, head_dim=128),
    "mistralai/Mistral-Nemo-Instruct-2407": Architecture(params_b=12.2, layers=40, kv_heads=8, head_dim=128),
    "mistralai/Mistral-Small-24B-Instruct-2501": Architecture(params_b=23.6, layers=40, kv_heads=8, head_dim=128),
    "mistralai/Codestral-22B-v0.1": Architecture(params_b=22.2, layers=56, kv_heads=8, head_dim=128),
    # the tiny random-weight model the local backend builds (see templates/build_tiny_model.py)
    "builtin:tiny-mistral": Architecture(params_b=0.0006, layers=2, kv_heads=2, head_dim=32),
}

# GPU memory in GiB, per device, as SkyPilot names the accelerators.
GPU_MEMORY_GIB: dict[str, float] = {
    "T4": 15, "V100": 16, "V100-32GB": 32, "A10": 24, "A10G": 22.5, "L4": 22.5, "L40": 45, "L40S": 45,
    "A40": 48, "RTX6000": 24, "RTXA6000": 48, "A100": 40, "A100-80GB": 80, "H100": 80, "H100-MEGA": 80,
    "H200": 141, "B200": 180, "GH200": 96, "MI300X": 192,
}

# Bytes per weight, by quantization (None: by dtype).
_QUANT_BYTES = {"awq": 0.56, "gptq": 0.56, "bitsandbytes": 0.56, "fp8": 1.0, "compressed-tensors": 1.0}
_DTYPE_BYTES = {"auto": 2.0, "bfloat16": 2.0, "float16": 2.0, "float32": 4.0}
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
    weight_bytes = _QUANT_BYTES.get(model.quantization or "", _DTYPE_BYTES[model.dtype])
    kv_bytes = 1.0 if "--kv-cache-dtype=fp8" in model.vllm_args or _has_pair(model.vllm_args, "--kv-cache-dtype", "fp8") else 2.0
    context = model.max_model_len or 32768
    weights = arch.params_b * 1e9 * weight_bytes / GIB
    # K and V, per layer, per KV head (GQA shares them across query heads), per token of context
    kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * kv_bytes * context / GIB
    usable = memory * gpu.count * recipe.engine.gpu_memory_utilization
    return FitEstimate(gpu, weights, kv, _OVERHEAD_GIB * gpu.count, usable, context)


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
