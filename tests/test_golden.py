"""Golden files: every folder under tests/golden/ is one rendering case, and one test checks them all.

A case is `case.yaml` (`recipe:` a built-in name or a file in the folder, `args:` the CLI overrides) beside
the expected `task.yaml` (what `render` prints) and, where the recipe needs SkyPilot global config (VPC
settings), `config.yaml`. Adding a case is adding a folder; `pytest --update-golden` writes the expected
files, whose diffs reviewers read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from _cli import run_cli
from mistral_deploy.fit import check_fit
from mistral_deploy.recipe import Overrides, load_recipe
from mistral_deploy.render import cloud_config, dump_yaml, render_task

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "case.yaml").is_file())


def _case(name: str) -> tuple[str, Overrides]:
    spec = yaml.safe_load((GOLDEN / name / "case.yaml").read_text(encoding="utf-8"))
    ref = spec["recipe"]
    if (GOLDEN / name / ref).is_file():
        ref = str(GOLDEN / name / ref)
    return ref, Overrides(**(spec.get("args") or {}))


def _rendered(name: str) -> dict[str, str]:
    ref, overrides = _case(name)
    recipe = load_recipe(ref, overrides).recipe
    check_fit(recipe)  # as `render` does: a golden case must be a recipe that renders
    files = {"task.yaml": dump_yaml(render_task(recipe))}
    config = cloud_config(recipe)
    if config:
        files["config.yaml"] = dump_yaml(config)
    return files


def test_there_are_cases() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str, request: pytest.FixtureRequest) -> None:
    folder = GOLDEN / name
    rendered = _rendered(name)
    if request.config.getoption("--update-golden"):
        for stale in ("task.yaml", "config.yaml"):
            if stale not in rendered and (folder / stale).exists():
                (folder / stale).unlink()
        for filename, text in rendered.items():
            (folder / filename).write_text(text, encoding="utf-8")
        return
    expected = {f: (folder / f).read_text(encoding="utf-8") for f in ("task.yaml", "config.yaml")
                if (folder / f).exists()}
    assert sorted(expected) == sorted(rendered), f"{name}: run pytest --update-golden and review the diff"
    for filename, text in rendered.items():
        assert text == expected[filename], f"{name}/{filename} differs; run pytest --update-golden and review the diff"


def test_rendering_is_deterministic() -> None:
    for name in CASES[:5]:
        assert _rendered(name) == _rendered(name)


def _cli_args(name: str) -> list[str]:
    spec = yaml.safe_load((GOLDEN / name / "case.yaml").read_text(encoding="utf-8"))
    ref = spec["recipe"]
    if (GOLDEN / name / ref).is_file():
        ref = str(GOLDEN / name / ref)
    argv = ["render", ref]
    args: dict[str, Any] = spec.get("args") or {}
    for key, value in args.items():
        if key == "spot":
            argv.append("--spot" if value else "--on-demand")
        elif isinstance(value, list):
            for item in value:
                argv += [f"--{key}", str(item)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


@pytest.mark.parametrize("name", ["mistral-7b-aws", "mixtral-8x7b-instruct-gcp-spot-ttl", "allow-port-name-aws"])
def test_render_command_prints_the_golden_task(name: str) -> None:
    result = run_cli(*_cli_args(name))
    assert result.exit_code == 0, result.output
    assert result.stdout == (GOLDEN / name / "task.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", CASES)
def test_rendered_scripts_parse_as_bash(name: str, tmp_path: Path) -> None:
    """SkyPilot runs setup and run with bash: each must at least parse (a stray quote would end the job)."""
    import subprocess

    task = yaml.safe_load(_rendered(name)["task.yaml"])
    for part in ("setup", "run"):
        script = tmp_path / f"{part}.sh"
        script.write_text(task[part])
        checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{part}: {checked.stderr}"
