"""`recipes`, `recipes show`, `render --out`, `schema`: what each prints or writes."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from _cli import run_cli
from mistral_deploy import resources_dir
from mistral_deploy.recipe import builtin_recipe_names

RECIPES = resources_dir("recipes")


def test_recipes_lists_every_builtin() -> None:
    result = run_cli("recipes")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("  ")]  # under their family's line
    assert sorted(listed) == builtin_recipe_names()
    assert [line for line in lines if not line.startswith("  ")][0] == "Ministral 3:"
    mixtral = next(line for line in lines if line.startswith("  mixtral-8x7b-instruct "))
    assert "mistralai/Mixtral-8x7B-Instruct-v0.1" in mixtral and "46.7B MoE (12.9B active)" in mixtral
    assert "Apache-2.0 (gated)" in mixtral and mixtral.endswith("fits A100-80GB:2")


@pytest.mark.parametrize("name", builtin_recipe_names())
def test_recipes_show_prints_the_file_with_its_comments(name: str) -> None:
    result = run_cli("recipes", "show", name)
    assert result.exit_code == 0, result.output
    text = (RECIPES / f"{name}.yaml").read_text(encoding="utf-8")
    assert result.stdout == text and result.stdout.startswith("#")


def test_recipes_show_unknown() -> None:
    result = run_cli("recipes", "show", "mistral-8b")
    assert result.exit_code == 3 and "did you mean" in result.stderr


def test_render_out_writes_the_task(tmp_path: Path) -> None:
    printed = run_cli("render", "mixtral-8x7b-instruct", "--cloud", "gcp", "--gpu", "A100-80GB:2")
    assert printed.exit_code == 0, printed.output
    out = tmp_path / "build"
    written = run_cli("render", "mixtral-8x7b-instruct", "--cloud", "gcp", "--gpu", "A100-80GB:2", "--out", str(out))
    assert written.exit_code == 0, written.output
    assert written.stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["task.yaml"]
    assert (out / "task.yaml").read_text(encoding="utf-8") == printed.stdout
    assert f"wrote {out / 'task.yaml'}" in written.stderr
    task = yaml.safe_load(printed.stdout)
    assert task["resources"]["accelerators"] == "A100-80GB:2" and task["resources"]["infra"] == "gcp"


def test_render_out_writes_a_service_and_skypilot_config(tmp_path: Path) -> None:
    recipe = tmp_path / "svc.yaml"
    recipe.write_text("name: svc\nmodel: {id: mistralai/Mistral-7B-v0.1, max_model_len: 8192}\n"
                      "resources: {cloud: aws, gpu: A10G}\nreplicas: 2\n", encoding="utf-8")
    result = run_cli("render", str(recipe), "--out", str(tmp_path / "a"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["service.yaml"]
    assert yaml.safe_load((tmp_path / "a" / "service.yaml").read_text())["service"]["replicas"] == 2

    result = run_cli("render", "mistral-7b", "--cloud", "gcp", "--network", "vpc", "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text()) == {"gcp": {"use_internal_ips": True}}
    printed = run_cli("render", "mistral-7b", "--cloud", "gcp", "--network", "vpc")
    assert "gcp.use_internal_ips=true" in printed.stderr
    assert yaml.safe_load(printed.stdout)["name"] == "mistral-7b"  # stdout stays the task alone


def test_schema_is_a_json_schema_every_builtin_satisfies() -> None:
    result = run_cli("schema")
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    files = sorted(RECIPES.glob("*.yaml")) + sorted(Path(__file__).parent.glob("golden/*/recipe.yaml"))
    for path in files:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8")))]
        assert not errors, f"{path}: {errors}"


@pytest.mark.parametrize("bad", [
    {"name": "x", "model": {"id": "m"}, "modle": {}},
    {"name": "x", "model": {"id": "m"}, "resources": {"gpu": "A10G:two"}},
    {"name": "x", "model": {"id": "m"}, "network": {"mode": "internet"}},
    {"name": "x", "model": {"id": "m"}, "lifetime": {"ttl": "soon"}},
    {"model": {"id": "m"}},
])
def test_schema_rejects_what_validate_rejects(bad: dict, tmp_path: Path) -> None:
    schema = json.loads(run_cli("schema").stdout)
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(bad))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad), encoding="utf-8")
    assert run_cli("validate", str(path)).exit_code == 3


def test_validate_prints_the_estimate() -> None:
    result = run_cli("validate", "mixtral-8x7b-instruct")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "built-in recipe mixtral-8x7b-instruct: valid"
    assert "A100-80GB:2: fits: weights 87.0 GiB + KV cache 4.0 GiB (32768 tokens)" in result.stdout
