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

_MINISTRAL_3_8B = Architecture(params_b=8.4, layers=34, kv_heads=8, head_dim=128, hidden=4096, vocab=131072,
                               vision_params_b=0.4)
_MISTRAL_SMALL_3 = Architecture(params_b=23.6, layers=40, kv_heads=8, head_dim=128, hidden=5120, vocab=131072,
                                vision_params_b=0.4)
_MISTRAL_LARGE_3 = Architecture(params_b=673, active_params_b=39, vision_params_b=2.5, layers=61, mla_kv_dim=576,
                                vocab=131072, weights="fp8")

# Architectures of the models the built-in recipes use (from each model's config.json).
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.3": Architecture(params_b=7.25, layers=32, kv_heads=8, head_dim=128,
                                                       hidden=4096, vocab=32768),
    # 4-bit quantizations of Mistral 7B Instruct v0.2
    "TheBloke/Mistral-7B-Instruct-v0.2-AWQ": _MISTRAL_7B,
    "TheBloke/Mistral-7B-Instruct-v0.2-GPTQ": _MISTRAL_7B,
    # 12.9B of its 46.7B used per token (Mistral's announcement, https://mistral.ai/news/mixtral-of-experts)
    "mistralai/Mixtral-8x7B-Instruct-v0.1": Architecture(params_b=46.7, layers=32, kv_heads=8, head_dim=128,
                                                         hidden=4096, vocab=32000, active_params_b=12.9),
    "mistralai/Mistral-Nemo-Instruct-2407": Architecture(params_b=12.2, layers=40, kv_heads=8, head_dim=128,
                                                         hidden=5120, vocab=131072),
    "mistralai/Mistral-Small-24B-Instruct-2501": Architecture(params_b=23.6, layers=40, kv_heads=8, head_dim=128,
                                                              hidden=5120, vocab=131072),
    "mistralai/Codestral-22B-v0.1": Architecture(params_b=22.2, layers=56, kv_heads=8, head_dim=128, hidden=6144,
                                                 vocab=32768),
    # Today's models (the recipes cite each model card). Sizes are the cards' ("8.4B Language Model", "0.4B
    # Vision Encoder"...); layers, hidden size and KV heads are config.json's (copies of it where noted).
    # Ministral 3 8B: 34 layers, hidden 4096, 32 heads / 8 KV heads, vocab 131072 (a copy of its config.json,
    # the same as transformers' Ministral3Config defaults); Instruct in FP8, Reasoning in BF16.
    "mistralai/Ministral-3-8B-Instruct-2512": _MINISTRAL_3_8B.model_copy(update={"weights": "fp8"}),
    "mistralai/Ministral-3-8B-Reasoning-2512": _MINISTRAL_3_8B,
    # Mistral Small 3.x: Mistral Small 3's language model (40 layers, hidden 5120, 8 KV heads) + the 0.4B
    # Pixtral encoder Ministral 3 also has (hidden 1024, 24 layers); Magistral Small 1.2 is built on it.
    "mistralai/Mistral-Small-3.2-24B-Instruct-2506": _MISTRAL_SMALL_3,
    "mistralai/Magistral-Small-2509": _MISTRAL_SMALL_3,
    # Devstral Small 2: the same shape in FP8 (a copy of its config.json: per-tensor FP8, vision and lm_head BF16)
    "mistralai/Devstral-Small-2-24B-Instruct-2512": _MISTRAL_SMALL_3.model_copy(update={"weights": "fp8"}),
    # Devstral 2: 88 layers, hidden 12288, 96 heads / 8 KV heads, vocab 131072, FP8 (a copy of its config.json)
    "mistralai/Devstral-2-123B-Instruct-2512": Architecture(params_b=123, layers=88, kv_heads=8, head_dim=128,
                                                            hidden=12288, vocab=131072, weights="fp8"),
    # Mistral Large 3: "673B params and 39B active" + "a 2.5B Vision Encoder" (card); DeepSeek V3's shape in
    # vLLM (MistralLarge3ForCausalLM): 61 layers caching a 576-wide latent (kv_lora_rank 512 + rope 64), 68.6
    # KiB of KV cache per token in BF16 as published for it; hidden size not published here (no exemption
    # of the embeddings from the 8 or 4 bits: an estimate a little low)
    "mistralai/Mistral-Large-3-675B-Instruct-2512": _MISTRAL_LARGE_3,
    "mistralai/Mistral-Large-3-675B-Instruct-2512-NVFP4": _MISTRAL_LARGE_3.model_copy(update={"weights": "nvfp4"}),
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


# What a checkpoint's `weights` (Architecture.weights) stores, as the formats above.
_CHECKPOINT_FORMATS: dict[str, str] = {"fp8": "fp8", "nvfp4": "modelopt_fp4"}


def weights_format(quantization: Optional[str], arch: Architecture) -> Optional[str]:
    """The quantization the weights are in: the recipe's --quantization, else the checkpoint's own format."""
    if quantization:
        return quantization
    return _CHECKPOINT_FORMATS.get(arch.weights or "")


def weights_bytes(model_dtype: str, quantization: Optional[str], arch: Architecture,
                  params_b: Optional[float] = None) -> float:
    """What the weights take in GPU memory: the quantized linear layers at their format's size, the rest
    (token embeddings and output head, norms, a vision encoder) at 16 bits. `params_b`: count only that many
    of the language model's parameters (a mixture of experts' active ones)."""
    params = (params_b or arch.params_b) * 1e9
    dtype_bytes = _DTYPE_BYTES[model_dtype]
    vision = (arch.vision_params_b or 0.0) * 1e9 * dtype_bytes
    fmt = QUANT_FORMATS.get(weights_format(quantization, arch) or "")
    if fmt is None:
        return params * dtype_bytes + vision
    kept = 2 * arch.vocab * arch.hidden if arch.vocab and arch.hidden else 0
    return kept * dtype_bytes + (params - kept) * fmt.bytes_per_weight + vision


def describe_size(arch: Architecture) -> str:
    """8.4B, 675B MoE (41B active), with `+ 0.4B vision` where the model has a vision encoder."""
    size = f"{arch.params_b:g}B"
    if arch.active_params_b:
        size += f" MoE ({arch.active_params_b:g}B active)"
    if arch.vision_params_b:
        size += f" + {arch.vision_params_b:g}B vision"
    return size


# Compute capability of each GPU (NVIDIA's CUDA GPU list): which weight formats run natively.
GPU_CAPABILITY: dict[str, float] = {
    "T4": 7.5, "V100": 7.0, "V100-32GB": 7.0, "RTX6000": 7.5, "A10": 8.6, "A10G": 8.6, "A40": 8.6,
    "RTXA6000": 8.6, "A100": 8.0, "A100-80GB": 8.0, "L4": 8.9, "L40": 8.9, "L40S": 8.9, "H100": 9.0,
    "H100-MEGA": 9.0, "H200": 9.0, "GH200": 9.0, "B200": 10.0,
}


@dataclass(frozen=True)
class FormatSupport:
    """How the pinned vLLM (0.32) runs a weight format on NVIDIA GPUs, from its source: below `minimum`
    it refuses the checkpoint (the method's get_min_capability); from `native` it computes in the format;
    between, a weight-only Marlin kernel keeps the memory saving and computes in 16 bits."""

    label: str
    native: float
    minimum: float
    fallback: str


# fp8: Fp8Config.get_min_capability() is 75; FP8 compute (CudaPlatform.supports_fp8) needs 89; below it the
#   FP8 linear and MoE kernels fall back to Marlin (model_executor/kernels/linear, fused_moe/oracle/fp8.py).
# nvfp4: ModelOptNvFp4Config and compressed-tensors' W4A4 NVFP4 scheme need 75; the native FP4 GEMMs need 100
#   (Blackwell, CUDA 12.8); before it MarlinNvFp4LinearKernel and the Marlin MoE experts run the weights.
FORMAT_SUPPORT: dict[str, FormatSupport] = {
    **dict.fromkeys(("fp8", "fbgemm_fp8", "fp8_per_tensor", "fp8_per_channel", "fp8_per_block"),
                    FormatSupport("FP8", 8.9, 7.5, "FP8 Marlin")),
    "modelopt": FormatSupport("FP8", 8.9, 8.0, "FP8 Marlin"),  # ModelOptFp8Config.get_min_capability() is 80
    **dict.fromkeys(("modelopt_fp4", "nvfp4_per_token"), FormatSupport("NVFP4", 10.0, 7.5, "FP4 Marlin")),
}


def kernel_support(quantization: Optional[str], arch: Architecture, gpu: str) -> tuple[bool, Optional[str]]:
    """Whether the pinned vLLM runs these weights on this GPU, and how, when it is not natively."""
    support = FORMAT_SUPPORT.get(weights_format(quantization, arch) or "")
    capability = GPU_CAPABILITY.get(gpu)
    if support is None or capability is None or capability >= support.native:
        return True, None
    if capability < support.minimum:
        return False, (f"{support.label} weights cannot run on {gpu} (compute capability {capability:.1f}; the pinned "
                       f"vLLM needs {support.minimum:.1f})")
    return True, (f"{support.label} weights run through vLLM's {support.fallback} kernel on {gpu} (compute "
                  f"capability {capability:.1f} < {support.native:.1f}): {support.label}'s memory saving, 16-bit compute")


def kv_bytes_per_token(arch: Architecture, kv_bytes: float, tensor_parallel: int = 1) -> float:
    """The KV cache one token of context takes, over all the GPUs of a tensor-parallel group."""
    if arch.mla_kv_dim:
        # multi-head latent attention caches one latent per layer, whole on every tensor-parallel rank
        return arch.layers * arch.mla_kv_dim * kv_bytes * tensor_parallel
    # K and V, per layer, per KV head (GQA shares them across query heads); with more ranks than KV heads,
    # each rank holds one head, copied
    kv_heads, head_dim = arch.kv_heads or 1, arch.head_dim or 0  # both set without mla_kv_dim (Architecture)
    copies = max(1, tensor_parallel // kv_heads)
    return 2 * arch.layers * kv_heads * head_dim * kv_bytes * copies


# CUDA context, activations and the sampler's buffers, per GPU.
_OVERHEAD_GIB = 1.5
def _gpus_and_nodes(text: str) -> tuple[GpuRequest, int]:
    """"H100:8x2" -> (H100:8, 2 nodes)."""
    gpu, _, nodes = text.partition("x")
    name, count = gpu.split(":")
    return GpuRequest(name=name, count=int(count)), int(nodes or 1)


# Suggestions, from smallest to largest: the first that fits is proposed. Past one node of eight, several
# such nodes (NAME:8xN): tensor parallelism within each, pipeline parallelism across them.
_SUGGEST = [_gpus_and_nodes(text) for text in (
    "T4:1", "L4:1", "A10G:1", "L40S:1", "A100:1", "A100-80GB:1", "H100:1", "A10G:4", "L40S:2", "A100:2",
    "A100-80GB:2", "H100:2", "H200:1", "H200:2", "A100-80GB:4", "H100:4", "H200:4", "B200:4", "A100-80GB:8",
    "H100:8", "H200:8", "B200:8", "A100-80GB:8x2", "H100:8x2", "H200:8x2", "B200:8x2", "H100:8x4", "H200:8x4",
    "B200:8x4")]


def describe_gpus(gpu: "GpuRequest | str", nodes: int = 1) -> str:
    """H100:8, or H100:8 x 2 nodes."""
    return f"{gpu} x {nodes} nodes" if nodes > 1 else str(gpu)


def gpu_flags(gpu: GpuRequest, nodes: int = 1) -> str:
    return f"--gpu {gpu} --nodes {nodes}" if nodes > 1 else f"--gpu {gpu}"


@dataclass(frozen=True)
class FitEstimate:
    gpu: GpuRequest
    weights_gib: float
    kv_cache_gib: float
    overhead_gib: float
    usable_gib: float  # all GPUs together, after gpu_memory_utilization
    context_tokens: int
    runs: bool = True  # the pinned vLLM has a kernel for the weights' format on this GPU
    kernel_note: Optional[str] = None  # how it runs them, when not natively (or why it cannot)
    nodes: int = 1  # machines of `gpu` each (pipeline parallelism across them)

    @property
    def needed_gib(self) -> float:
        return self.weights_gib + self.kv_cache_gib + self.overhead_gib

    @property
    def fits(self) -> bool:
        return self.runs and self.needed_gib <= self.usable_gib

    def summary(self) -> str:
        verdict = "fits" if self.fits else "does NOT fit" if self.runs else "does NOT run"
        note = f"; {self.kernel_note}" if self.kernel_note else ""
        return (
            f"{describe_gpus(self.gpu, self.nodes)}: {verdict}: weights {self.weights_gib:.1f} GiB + KV cache {self.kv_cache_gib:.1f} GiB "
            f"({self.context_tokens} tokens) + overhead {self.overhead_gib:.1f} GiB = {self.needed_gib:.1f} GiB "
            f"of {self.usable_gib:.1f} GiB usable{note}"
        )


def architecture_of(recipe: Recipe) -> Optional[Architecture]:
    return recipe.model.architecture or KNOWN_ARCHITECTURES.get(recipe.model.id)


def estimate(recipe: Recipe, gpu: GpuRequest, arch: Architecture, nodes: Optional[int] = None
             ) -> Optional[FitEstimate]:
    """The memory the model needs against what `nodes` machines of `gpu` give (default: the recipe's
    num_nodes). Tensor parallelism spans each node's GPUs, pipeline parallelism the nodes: each stage holds
    its share of the layers, their weights and their KV cache, so the sums are those of one big machine."""
    memory = GPU_MEMORY_GIB.get(gpu.name)
    if memory is None:
        return None
    nodes = nodes or recipe.resources.num_nodes
    model = recipe.model
    kv_bytes = _kv_dtype_bytes(model.vllm_args)
    context = model.max_model_len or 32768
    weights = weights_bytes(model.dtype, model.quantization, arch) / GIB
    tensor_parallel = recipe.resources.tensor_parallel or gpu.count
    kv = kv_bytes_per_token(arch, kv_bytes, tensor_parallel) * context / GIB
    usable = memory * gpu.count * nodes * recipe.engine.gpu_memory_utilization
    runs, note = kernel_support(model.quantization, arch, gpu.name)
    return FitEstimate(gpu, weights, kv, _OVERHEAD_GIB * gpu.count * nodes, usable, context, runs, note, nodes)


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
        fits = [found for found in (_suggestion(recipe, arch), _more_nodes(recipe, arch, worst)) if found]
        hint = ("; would fit: " + ", or ".join(f"{describe_gpus(*f)} ({gpu_flags(*f)})" for f in fits)) if fits else ""
        if not worst.runs:
            raise FitError(f"{recipe.model.id}: {worst.kernel_note}{hint}")
        raise FitError(
            f"{recipe.model.id} does not fit {describe_gpus(worst.gpu, worst.nodes)}: "
            f"needs about {worst.needed_gib:.0f} GiB "
            f"(weights {worst.weights_gib:.0f} + KV cache {worst.kv_cache_gib:.1f} for {worst.context_tokens} tokens), "
            f"{worst.usable_gib:.0f} GiB usable{hint}"
        )
    return estimates


def _more_nodes(recipe: Recipe, arch: Architecture, est: FitEstimate) -> Optional[tuple[GpuRequest, int]]:
    """The same GPUs on the fewest more nodes (up to 4 in all) that the model fits, if any."""
    if not est.runs:
        return None
    for nodes in range(est.nodes + 1, max(est.nodes, 4) + 1):
        more = estimate(recipe, est.gpu, arch, nodes)
        if more is not None and more.fits:
            return est.gpu, nodes
    return None


def cautions(recipe: Recipe) -> list[str]:
    """What `validate` and `up` say of a recipe without refusing it: the recipe's own, and a node too many."""
    extra = fewer_nodes(recipe)
    return recipe.cautions() + ([extra] if extra else [])


def fewer_nodes(recipe: Recipe) -> Optional[str]:
    """A caution when the recipe spans more nodes than its model needs on every GPU candidate: the extra
    nodes add cost and a pipeline stage each, no memory the model uses."""
    arch = architecture_of(recipe)
    nodes = recipe.resources.num_nodes
    if arch is None or nodes < 2 or not recipe.resources.gpu:
        return None
    fewer = [estimate(recipe, gpu, arch, nodes - 1) for gpu in recipe.resources.gpu]
    if not fewer or not all(e is not None and e.fits for e in fewer):
        return None
    return (f"resources.num_nodes: {recipe.model.id} fits {nodes - 1} node{'s' if nodes > 2 else ''} of "
            f"{', '.join(str(g) for g in recipe.resources.gpu)}: node {nodes} adds cost and a pipeline stage, "
            "no memory it needs")


def smallest_fit(recipe: Recipe) -> Optional[str]:
    """The smallest GPU set (of the usual ones) the recipe's model fits at its context length: "H100:8", or
    "H100:8 x 2 nodes"."""
    arch = architecture_of(recipe)
    found = _suggestion(recipe, arch) if arch is not None else None
    return describe_gpus(*found) if found else None


def _suggestion(recipe: Recipe, arch: Architecture) -> Optional[tuple[GpuRequest, int]]:
    for gpu, nodes in _SUGGEST:
        est = estimate(recipe, gpu, arch, nodes)
        if est is not None and est.fits:
            return gpu, nodes
    return None


# Memory bandwidth per GPU, GB/s, from NVIDIA's datasheets (the SXM parts where a cloud rents both).
GPU_BANDWIDTH_GBPS: dict[str, float] = {
    "T4": 320, "V100": 900, "V100-32GB": 900, "A10": 600, "A10G": 600, "L4": 300, "L40": 864, "L40S": 864,
    "A40": 696, "A100": 1555, "A100-80GB": 2039, "H100": 3350, "H200": 4800, "B200": 8000,
}
# The workload the estimate is made for: requests in flight, and tokens of context each holds.
ESTIMATE_CONCURRENCY, ESTIMATE_CONTEXT = 16, 1024
ESTIMATE_SOURCE = (f"upper bound: decoding {ESTIMATE_CONCURRENCY} requests of {ESTIMATE_CONTEXT} tokens, each step "
                   "reads the weights and their KV cache once at the GPU's datasheet memory bandwidth; "
                   "measure yours with `mistral-deploy bench`")


def decode_ceiling(recipe: Recipe, gpu: GpuRequest, nodes: Optional[int] = None) -> Optional[float]:
    """Output tokens/s the GPUs cannot exceed for this model (decode is memory-bound): an estimate from
    the datasheet bandwidth, never a measurement; None for an unknown model or GPU. Across `nodes` (default:
    the recipe's), the pipeline's stages each read their share while the others work on other requests."""
    arch = architecture_of(recipe)
    bandwidth = GPU_BANDWIDTH_GBPS.get(gpu.name)
    if arch is None or bandwidth is None:
        return None
    kv_bytes = kv_bytes_per_token(arch, _kv_dtype_bytes(recipe.model.vllm_args))
    nodes = nodes or recipe.resources.num_nodes
    # a mixture of experts reads its active parameters per token (fewer than all when the batch's tokens
    # share experts: counting the active ones keeps this an upper bound). Across nodes (pipeline stages),
    # the requests split into one batch per stage in flight: each stage reads its share of the weights once
    # per batch, so a round of all the requests still reads the whole weights at one node's bandwidth; only
    # the KV cache's reads are shared out.
    step_bytes = (weights_bytes(recipe.model.dtype, recipe.model.quantization, arch, arch.active_params_b)
                  + ESTIMATE_CONCURRENCY * ESTIMATE_CONTEXT * kv_bytes / nodes)
    return ESTIMATE_CONCURRENCY * bandwidth * 1e9 * gpu.count / step_bytes
