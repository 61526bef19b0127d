"""Today's Mistral models in the fit check: FP8 and NVFP4 checkpoints, mixtures of experts, a vision encoder,
multi-head latent attention, tensor-parallel splits, and which GPUs run each weight format natively (asked of
the pinned vLLM's own code, as tests/test_quantization.py does for AWQ and GPTQ)."""

from __future__ import annotations

import json
import subprocess

import pytest

from _cli import run_cli
from mistral_deploy import engine
from mistral_deploy.errors import FitError
from mistral_deploy.fit import (FORMAT_SUPPORT, KNOWN_ARCHITECTURES, check_fit, decode_ceiling,
                                kernel_support, kv_bytes_per_token, weights_bytes)
from mistral_deploy.recipe import Architecture, GpuRequest, Overrides, load_recipe, validate_recipe_data

TODAY = ["ministral-3-8b-instruct", "ministral-3-8b-reasoning", "mistral-small-3-2", "magistral-small",
         "devstral-small-2", "devstral-2", "mistral-large-3", "mistral-large-3-nvfp4"]


@pytest.mark.parametrize("name", TODAY)
def test_todays_recipes_fit_every_gpu_they_list(name: str) -> None:
    recipe = load_recipe(name).recipe
    assert recipe.model.id in KNOWN_ARCHITECTURES and recipe.model.family and recipe.model.license
    estimates = check_fit(recipe)
    assert [str(e.gpu) for e in estimates] == [str(g) for g in recipe.resources.gpu]
    assert all(e.fits for e in estimates), [e.summary() for e in estimates]


def test_fp8_weights_count_one_byte_and_the_rest_two() -> None:
    arch = KNOWN_ARCHITECTURES["mistralai/Devstral-2-123B-Instruct-2512"]
    kept = 2 * 131072 * 12288  # token embeddings and output head stay 16-bit
    assert weights_bytes("auto", None, arch) == pytest.approx(kept * 2 + (123e9 - kept) * 1)
    bf16 = arch.model_copy(update={"weights": None})
    assert weights_bytes("auto", None, bf16) == pytest.approx(123e9 * 2)


def test_nvfp4_is_four_bits_and_a_scale_per_16_weights_and_the_vision_encoder_stays_16_bit() -> None:
    arch = KNOWN_ARCHITECTURES["mistralai/Mistral-Large-3-675B-Instruct-2512-NVFP4"]
    assert weights_bytes("auto", None, arch) == pytest.approx(673e9 * (4 + 8 / 16) / 8 + 2.5e9 * 2)
    fp8 = KNOWN_ARCHITECTURES["mistralai/Mistral-Large-3-675B-Instruct-2512"]
    assert weights_bytes("auto", None, fp8) == pytest.approx(673e9 + 2.5e9 * 2)


def test_a_mixture_of_experts_holds_every_expert_and_decodes_reading_the_active_ones() -> None:
    recipe = load_recipe("mixtral-8x7b-instruct").recipe
    arch = KNOWN_ARCHITECTURES[recipe.model.id]
    dense = recipe.model_copy(update={"model": recipe.model.model_copy(
        update={"architecture": arch.model_copy(update={"active_params_b": None})})})
    assert check_fit(recipe)[0].weights_gib == check_fit(dense)[0].weights_gib  # all experts in memory
    ratio = decode_ceiling(recipe, GpuRequest(name="H100", count=2)) / decode_ceiling(dense, GpuRequest(name="H100",
                                                                                                        count=2))
    assert 2.5 < ratio < 46.7 / 12.9  # fewer bytes read per step; the KV cache is read either way


def test_latent_attention_caches_one_latent_per_layer_on_every_tensor_parallel_rank() -> None:
    arch = KNOWN_ARCHITECTURES["mistralai/Mistral-Large-3-675B-Instruct-2512"]
    assert kv_bytes_per_token(arch, 2.0) == 61 * 576 * 2 == 70272  # the 68.6 KiB per token published for it
    assert kv_bytes_per_token(arch, 2.0, 8) == 8 * 70272
    gqa = KNOWN_ARCHITECTURES["mistralai/Devstral-2-123B-Instruct-2512"]
    assert kv_bytes_per_token(gqa, 2.0, 8) == kv_bytes_per_token(gqa, 2.0)  # 8 KV heads over 8 ranks: split
    assert kv_bytes_per_token(gqa, 2.0, 16) == 2 * kv_bytes_per_token(gqa, 2.0)  # 16 ranks: each head twice


def test_an_architecture_needs_its_kv_shape() -> None:
    with pytest.raises(ValueError, match="kv_heads and head_dim"):
        Architecture(params_b=7, layers=32, kv_heads=8)
    with pytest.raises(ValueError, match="active_params_b"):
        Architecture(params_b=7, layers=32, kv_heads=8, head_dim=128, active_params_b=9)
    data = {"name": "x", "model": {"id": "me/latent", "architecture": {"params_b": 16, "layers": 27,
                                                                       "mla_kv_dim": 576, "weights": "fp8"}},
            "resources": {"gpu": "L40S:1"}}
    recipe = validate_recipe_data(data, "test").recipe
    assert check_fit(recipe)[0].fits


def test_which_gpus_run_fp8_and_nvfp4_natively_and_which_through_marlin() -> None:
    fp8 = KNOWN_ARCHITECTURES["mistralai/Ministral-3-8B-Instruct-2512"]
    assert kernel_support(None, fp8, "H100") == (True, None) and kernel_support(None, fp8, "L4") == (True, None)
    runs, note = kernel_support(None, fp8, "A100-80GB")
    assert runs and "FP8 Marlin" in note and "8.0 < 8.9" in note
    runs, note = kernel_support(None, fp8, "V100")
    assert not runs and "cannot run on V100" in note
    nvfp4 = KNOWN_ARCHITECTURES["mistralai/Mistral-Large-3-675B-Instruct-2512-NVFP4"]
    assert kernel_support(None, nvfp4, "B200") == (True, None)
    runs, note = kernel_support(None, nvfp4, "H100")
    assert runs and "FP4 Marlin" in note
    # a BF16 checkpoint forced to FP8 at load time (--quantization fp8) is FP8 weights too
    assert kernel_support("fp8", KNOWN_ARCHITECTURES["mistralai/Mistral-7B-v0.1"], "A10G")[1] is not None


def test_validate_says_how_each_gpu_runs_the_weights_and_refuses_one_that_cannot() -> None:
    shown = run_cli("validate", "devstral-small-2", "--gpu", "A100-80GB")
    assert shown.exit_code == 0, shown.output
    assert "FP8 Marlin kernel on A100-80GB" in shown.stdout
    refused = run_cli("validate", "devstral-small-2", "--gpu", "V100:4")
    assert refused.exit_code == 4
    assert "FP8 weights cannot run on V100" in refused.stderr and "Traceback" not in refused.output
    assert len(refused.stderr.strip().splitlines()) == 1


def test_eight_h100_hold_large_3_in_nvfp4_but_not_in_fp8() -> None:
    with pytest.raises(FitError, match="does not fit H100:8.*would fit: H200:8"):
        check_fit(load_recipe("mistral-large-3", Overrides(gpu="H100:8")).recipe)
    assert check_fit(load_recipe("mistral-large-3-nvfp4", Overrides(gpu="H100:8")).recipe)[0].fits


def test_recipes_lists_today_s_models_by_family_with_size_licence_and_smallest_fit() -> None:
    listed = run_cli("recipes", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["mistral-large-3"]["size"] == "673B MoE (39B active) + 2.5B vision"
    assert rows["mistral-large-3"]["smallest_fit"] == "H200:8" and rows["devstral-2"]["smallest_fit"] == "H200:2"
    assert rows["devstral-2"]["license"].startswith("Modified MIT")
    assert rows["ministral-3-8b-instruct"]["smallest_fit"] == "L4:1"
    families = [r["family"] for r in json.loads(listed.stdout)]
    assert families.index("Ministral 3") < families.index("Mistral 7B")  # today's first
    assert families == sorted(families, key=families.index)  # grouped: each family's recipes together
    table = run_cli("recipes").stdout.splitlines()
    assert "Mistral Large:" in table
    line = next(x for x in table if x.strip().startswith("devstral-2 "))
    assert "123B" in line and "Modified MIT" in line and "fits H200:2" in line


_SELECTION = """
import ast, json, pathlib
import vllm.platforms
from vllm.platforms import PlatformEnum, current_platform
from vllm.platforms.interface import DeviceCapability
from vllm.model_executor.layers.quantization.fp8 import Fp8Config
from vllm.model_executor.layers.quantization.modelopt import ModelOptFp8Config, ModelOptNvFp4Config
from vllm.model_executor.layers.quantization.utils import marlin_utils_fp4, marlin_utils_fp8

current_platform._enum = PlatformEnum.CUDA
out = {"min": {"fp8": Fp8Config.get_min_capability(), "modelopt": ModelOptFp8Config.get_min_capability(),
               "modelopt_fp4": ModelOptNvFp4Config.get_min_capability()}, "marlin": {}}
for cc in (70, 75, 80, 90):
    type(current_platform).get_device_capability = classmethod(
        lambda cls, device_id=0, cc=cc: DeviceCapability(cc // 10, cc % 10))
    out["marlin"][cc] = [marlin_utils_fp8.is_fp8_marlin_supported(), marlin_utils_fp4.is_fp4_marlin_supported()]
# FP8 compute: CudaPlatform.supports_fp8 (the CUDA platform cannot be imported from this CPU build: read it)
source = (pathlib.Path(vllm.platforms.__file__).parent / "cuda.py").read_text()
for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.FunctionDef) and node.name == "supports_fp8":
        out["fp8_native"] = [c.args[0].value for c in ast.walk(node) if isinstance(c, ast.Call)
                             and getattr(c.func, "attr", "") == "has_device_capability"]
print(json.dumps(out))
"""


@pytest.mark.engine
def test_the_format_thresholds_are_the_pinned_vllms() -> None:
    done = subprocess.run([engine.engine_python(), "-c", _SELECTION], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    for method, minimum in seen["min"].items():
        assert FORMAT_SUPPORT[method].minimum == minimum / 10, method
    assert seen["fp8_native"] == [89] and FORMAT_SUPPORT["fp8"].native == 8.9
    # Marlin runs FP8 and FP4 weights from 7.5: the fallback between the minimum and native compute
    assert seen["marlin"] == {"70": [False, False], "75": [True, True], "80": [True, True], "90": [True, True]}


def test_nodes_add_memory_not_decode_speed() -> None:
    """Pipeline stages on more nodes hold a larger model; a round of requests still reads the whole weights at
    one node's bandwidth, so the throughput ceiling grows only by the KV cache's share."""
    from mistral_deploy.fit import decode_ceiling
    from mistral_deploy.recipe import GpuRequest, load_recipe

    recipe = load_recipe("mistral-large-3-2-nodes").recipe
    gpu = GpuRequest(name="H100", count=8)
    one, two = decode_ceiling(recipe, gpu, 1), decode_ceiling(recipe, gpu, 2)
    assert one is not None and two is not None
    assert one < two < 1.5 * one
