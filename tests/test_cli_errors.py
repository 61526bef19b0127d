"""Every user mistake is one line on stderr that names the file, the field path (or the flag) and what is
expected, exits with the documented code, and shows no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from _cli import run_cli
from mistral_deploy import resources_dir
from mistral_deploy.errors import EXIT_CODES, FitError, RecipeError
from mistral_deploy.recipe import Recipe, builtin_recipe_names, load_recipe, validate_recipe_data

USAGE_ERROR = 2


def _write(tmp_path: Path, text: str, name: str = "my-recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _one_error_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unknown_top_level_key_suggests_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: my-endpoint\nmodle:\n  id: mistralai/Mistral-7B-v0.1\n")
    line = _one_error_line(run_cli("validate", str(path)), RecipeError.exit_code)
    assert str(path) in line and "modle" in line and "did you mean 'model'?" in line


def test_unknown_nested_key_names_its_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\nmodel: {id: mistralai/Mistral-7B-v0.1}\nresources:\n  gpus: A10G\n")
    line = _one_error_line(run_cli("validate", str(path)), RecipeError.exit_code)
    assert "resources.gpus" in line and "did you mean 'gpu'?" in line


def test_bad_gpu_string_names_the_flag_and_the_form(tmp_path: Path) -> None:
    line = _one_error_line(run_cli("validate", "mistral-7b", "--gpu", "A10G:two"), RecipeError.exit_code)
    assert "--gpu" in line and "NAME:COUNT" in line and "A10G:two" in line


def test_bad_gpu_in_a_file_names_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\nmodel: {id: mistralai/Mistral-7B-v0.1}\nresources: {gpu: 'A10G x2'}\n")
    line = _one_error_line(run_cli("render", str(path), "--cloud", "aws"), RecipeError.exit_code)
    assert str(path) in line and "resources.gpu" in line and "NAME:COUNT" in line


def test_bad_network_flag_names_the_flag() -> None:
    line = _one_error_line(run_cli("render", "mistral-7b", "--cloud", "aws", "--network", "internet"),
                           RecipeError.exit_code)
    assert "--network" in line and "'public', 'private' or 'vpc'" in line and "internet" in line


def test_bad_ttl_flag_says_what_a_duration_is() -> None:
    line = _one_error_line(run_cli("validate", "mistral-7b", "--ttl", "soon"), RecipeError.exit_code)
    assert "--ttl" in line and "4h" in line


def test_missing_file() -> None:
    line = _one_error_line(run_cli("validate", "no/such/recipe.yaml"), RecipeError.exit_code)
    assert "no/such/recipe.yaml" in line and "not found" in line


def test_unknown_builtin_name_suggests_the_closest() -> None:
    line = _one_error_line(run_cli("render", "mistral-7b-instruc", "--cloud", "aws"), RecipeError.exit_code)
    assert "did you mean 'mistral-7b-instruct'?" in line and "tiny-mistral" in line


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\nmodel:\n  id: mistralai/Mistral-7B-v0.1\n   dtype: bfloat16\n")
    line = _one_error_line(run_cli("validate", str(path)), RecipeError.exit_code)
    assert f"{path}:4:" in line and "YAML syntax error" in line


def test_a_recipe_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, "- just\n- a list\n")
    line = _one_error_line(run_cli("validate", str(path)), RecipeError.exit_code)
    assert "expected a YAML mapping" in line


@pytest.mark.parametrize("command", ["validate", "render", "plan"])
def test_mixtral_on_one_a10g_does_not_fit_and_says_what_would(command: str) -> None:
    args = [command, "mixtral-8x7b-instruct", "--gpu", "A10G"] + (["--cloud", "aws"] if command == "render" else [])
    line = _one_error_line(run_cli(*args), FitError.exit_code)
    assert "does not fit A10G:1" in line and "would fit:" in line and "--gpu A100-80GB:2" in line


def test_usage_errors_exit_2_without_traceback() -> None:
    result = run_cli("render", "mistral-7b", "--no-such-flag")
    assert result.exit_code == USAGE_ERROR and "Traceback" not in result.output
    assert "--no-such-flag" in result.output
    result = run_cli("no-such-command")
    assert result.exit_code == USAGE_ERROR and "Traceback" not in result.output


def test_render_to_an_unwritable_folder(tmp_path: Path) -> None:
    blocker = _write(tmp_path, "a file, not a folder", name="out")
    result = run_cli("render", "mistral-7b", "--cloud", "aws", "--out", str(blocker / "sub"))
    line = _one_error_line(result, 1)
    assert "--out" in line


def test_render_refuses_the_local_cloud() -> None:
    line = _one_error_line(run_cli("render", "tiny-mistral"), RecipeError.exit_code)
    assert "resources.cloud" in line and "--cloud aws" in line


def test_exit_codes_command_documents_every_code() -> None:
    result = run_cli("exit-codes")
    assert result.exit_code == 0
    for code in EXIT_CODES:
        assert f"{code:>3}  " in result.stdout


def test_a_real_subprocess_reports_one_line(cli_path: str, tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\nmodel: {id: mistralai/Mistral-7B-v0.1}\nnetwork: {mode: public, tsl: true}\n")
    proc = subprocess.run([cli_path, "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == RecipeError.exit_code
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "network.tsl" in proc.stderr and "did you mean 'tls'?" in proc.stderr


@pytest.mark.parametrize("name", builtin_recipe_names())
def test_recipe_round_trip(name: str) -> None:
    recipe = load_recipe(name).recipe
    data = recipe.to_yaml_config()
    again = validate_recipe_data(data, f"round trip of {name}").recipe
    assert again == recipe
    assert again.to_yaml_config() == data
    assert isinstance(again, Recipe)


@pytest.mark.parametrize("args", [["--hos", "0.0.0.0"], ["--host=0.0.0.0"], ["--api_key", "x"], ["--served-model", "x"],
                                  ["--uds", "/tmp/s"], ["--port=9"]])
def test_engine_flags_that_would_bypass_the_gateway_are_refused_even_abbreviated(args: list[str], tmp_path: Path) -> None:
    """vLLM's parser takes '_' for '-' and unambiguous prefixes (--hos = --host)."""
    data = yaml.safe_load((resources_dir("recipes") / "tiny-mistral.yaml").read_text())
    data["model"]["vllm_args"] = args
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    r = run_cli("validate", str(path))
    assert r.exit_code == 3 and "model.vllm_args" in r.stderr and "set by mistral-deploy" in r.stderr


def test_a_served_name_cannot_smuggle_gateway_config(tmp_path: Path) -> None:
    data = yaml.safe_load((resources_dir("recipes") / "tiny-mistral.yaml").read_text())
    data["model"]["served_name"] = "m\nhttp { server { listen 0.0.0.0:9999; } }"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    r = run_cli("validate", str(path))
    assert r.exit_code == 3 and "model.served_name" in r.stderr
