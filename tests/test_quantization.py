"""Quantized models: the recipe accepts exactly the --quantization values the pinned vLLM does, and the fit
check counts a quantized checkpoint's weights as the checkpoint stores them.

Each method's size is checked against the tensors its checkpoint holds for Mistral 7B (the shapes of every
linear layer, as AutoAWQ, AutoGPTQ and vLLM's FP8 write them), counted here tensor by tensor, and against
the published size of the built-in recipes' checkpoints.
"""

from __future__ import annotations

import subprocess
import typing
from typing import Any

import pytest

from mistral_deploy import engine
from mistral_deploy.errors import FitError
from mistral_deploy.fit import GIB, KNOWN_ARCHITECTURES, check_fit, weights_bytes
from mistral_deploy.recipe import (Overrides, QuantizationMethod, builtin_recipes_dir, load_recipe,
                                   validate_recipe_data)

# Mistral 7B (v0.1/v0.2 instruct): config.json
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 32, 8, 128, 32000


def _linear_shapes() -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear layer the quantization covers."""
    per_layer = [
        (HIDDEN, HEADS * HEAD_DIM), (HIDDEN, KV_HEADS * HEAD_DIM), (HIDDEN, KV_HEADS * HEAD_DIM),  # q, k, v
        (HEADS * HEAD_DIM, HIDDEN),  # o
        (HIDDEN, INTERMEDIATE), (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN),  # gate, up, down
    ]
    return per_layer * LAYERS


def _unquantized_bytes() -> int:
    """Token embeddings and output head, the layers' two norms and the final one, float16."""
    return 2 * (2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN)


def _awq_checkpoint_bytes(group: int = 128) -> int:
    # AutoAWQ GEMM: qweight int32 [in, out/8], qzeros int32 [in/group, out/8], scales fp16 [in/group, out]
    total = 0
    for i, o in _linear_shapes():
        total += i * (o // 8) * 4 + (i // group) * (o // 8) * 4 + (i // group) * o * 2
    return total + _unquantized_bytes()


def _gptq_checkpoint_bytes(group: int = 128) -> int:
    # AutoGPTQ: qweight int32 [in/8, out], qzeros int32 [in/group, out/8], scales fp16 [in/group, out],
    # g_idx int32 [in]
    total = 0
    for i, o in _linear_shapes():
        total += (i // 8) * o * 4 + (i // group) * (o // 8) * 4 + (i // group) * o * 2 + i * 4
    return total + _unquantized_bytes()


def _fp8_checkpoint_bytes() -> int:
    # one byte per weight, one float32 scale per output channel
    return sum(i * o + o * 4 for i, o in _linear_shapes()) + _unquantized_bytes()


@pytest.mark.parametrize(("method", "checkpoint"), [
    ("awq", _awq_checkpoint_bytes), ("awq_marlin", _awq_checkpoint_bytes),
    ("gptq", _gptq_checkpoint_bytes), ("gptq_marlin", _gptq_checkpoint_bytes),
    ("fp8", _fp8_checkpoint_bytes),
])
def test_the_fit_check_counts_a_quantized_checkpoint_as_stored(method: str, checkpoint) -> None:
    arch = KNOWN_ARCHITECTURES["TheBloke/Mistral-7B-Instruct-v0.2-AWQ"]
    counted = checkpoint()
    estimated = weights_bytes("float16", method, arch)
    assert abs(estimated - counted) / counted < 0.005, (estimated / GIB, counted / GIB)
    # and far from the unquantized size (what the check counted before: 0.56 bytes a weight, whatever the method)
    assert estimated < 0.6 * weights_bytes("float16", None, arch)


def test_the_built_in_checkpoints_published_sizes() -> None:
    # the Hub lists model.safetensors at 4.15 GB (AWQ) and 4.16 GB (GPTQ, main branch)
    arch = KNOWN_ARCHITECTURES["TheBloke/Mistral-7B-Instruct-v0.2-AWQ"]
    assert abs(weights_bytes("float16", "awq", arch) / 1e9 - 4.15) < 0.03
    assert abs(weights_bytes("float16", "gptq", arch) / 1e9 - 4.16) < 0.03


@pytest.mark.parametrize("name", ["mistral-7b-instruct-awq", "mistral-7b-instruct-gptq"])
def test_the_quantized_recipes_fit_a_t4_on_every_cloud_and_the_full_model_does_not(name: str) -> None:
    for cloud in ("aws", "gcp", "azure"):
        recipe = load_recipe(name, Overrides(cloud=cloud)).recipe
        assert [str(g) for g in recipe.resources.gpu] == ["T4:1"] and recipe.model.dtype == "float16"
        assert check_fit(recipe)[0].fits
    with pytest.raises(FitError, match="does not fit T4"):
        check_fit(load_recipe("mistral-7b-instruct", Overrides(cloud="aws", gpu="T4")).recipe)


def test_a_quantization_vllm_does_not_know_is_refused_by_name() -> None:
    data = load_recipe("mistral-7b-instruct-awq").recipe.to_yaml_config()
    data["model"]["quantization"] = "bitsandbytes"  # accepted by older vLLMs, not by the pinned one
    with pytest.raises(Exception, match="model.quantization"):
        validate_recipe_data(data, "test")


@pytest.mark.engine
def test_the_recipe_accepts_exactly_the_pinned_vllms_quantizations() -> None:
    code = ("from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS\n"
            "print('\\n'.join(QUANTIZATION_METHODS))")
    done = subprocess.run([engine.engine_python(), "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert engine.engine_version(engine.engine_python()) == engine.VLLM_VERSION
    assert sorted(done.stdout.split()) == sorted(typing.get_args(QuantizationMethod))


# What the pinned vLLM selects for the built-in quantized recipes on a T4, asked of vLLM's own selection code:
# the platform is made to say CUDA at compute capability 7.5 (this build runs on a CPU; no kernel runs here).
_T4_SELECTION = """
import json, torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
from vllm.model_executor.layers.quantization.utils.marlin_utils import check_marlin_supported
from vllm.platforms import PlatformEnum, current_platform
from vllm.platforms.interface import DeviceCapability

current_platform._enum = PlatformEnum.CUDA
current_platform.get_device_capability = lambda device_id=0: DeviceCapability(7, 5)
checkpoints = {  # as TheBloke's checkpoints' quantize_config.json describe them (GPTQ: group size 128, sym)
    "awq": (AutoAWQConfig, {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}),
    "gptq": (AutoGPTQConfig, {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                              "sym": True}),
}
out = {}
for name, (cls, hf) in checkpoints.items():
    config = cls.from_config(hf)
    zp = name == "awq"
    layer = MPLinearLayerConfig(full_weight_shape=(4096, 14336), partition_weight_shape=(4096, 14336),
                                weight_type=config.quant_type, act_type=torch.float16, group_size=128,
                                zero_points=zp)
    out[name] = {
        "method": cls.override_quantization_method(hf, name),
        "min_capability": cls.get_min_capability(),
        "marlin": {cc: check_marlin_supported(config.quant_type, 128, zp, cc) for cc in (70, 75)},
        "kernel": choose_mp_linear_kernel(layer, compute_capability=75).__name__,
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def t4_selection() -> dict[str, Any]:
    import json

    done = subprocess.run([engine.engine_python(), "-c", _T4_SELECTION], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.engine
@pytest.mark.parametrize("name", ["awq", "gptq"])
def test_the_quantized_recipes_say_what_the_pinned_vllm_runs_on_a_t4(name: str, t4_selection: dict[str, Any]) -> None:
    """Marlin needs compute capability 7.5 (marlin_utils.py): a T4 (7.5) runs the AWQ and GPTQ recipes on
    Marlin's kernels, and the recipes' comments say so."""
    selected = t4_selection[name]
    assert selected["method"] == f"auto_{name}" and selected["min_capability"] <= 75
    assert selected["marlin"] == {"70": False, "75": True}
    assert selected["kernel"] == "MarlinLinearKernel"
    assert load_recipe(f"mistral-7b-instruct-{name}").recipe.model.dtype == "float16"  # no bf16 below 8.0
    text = (builtin_recipes_dir() / f"mistral-7b-instruct-{name}.yaml").read_text(encoding="utf-8")
    comment = next(line for line in text.splitlines() if line.strip().startswith("quantization:"))
    assert "Marlin" in comment and "not Marlin" not in comment, comment
