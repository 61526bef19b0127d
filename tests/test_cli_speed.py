"""`--help`, `recipes`, `validate` and `render` never import SkyPilot, vLLM or torch (each costs seconds).

Checked in a fresh interpreter, which runs the CLI's main() for each command and then lists the heavy
modules it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ("sky", "vllm", "torch")

_RUNNER = """
import json, sys
from mistral_deploy.cli import main
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), (argv, exc.code)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in json.loads(sys.argv[2]))
print(json.dumps(heavy), file=sys.stderr)
"""


def _heavy_modules_after(commands: list[list[str]], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(commands), json.dumps(heavy)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_fast_commands_do_not_import_sky_vllm_or_torch() -> None:
    commands = [["--help"], ["recipes"], ["validate", "tiny-mistral"], ["render", "mistral-7b", "--cloud", "aws"],
                ["recipes", "show", "mistral-7b"], ["schema"]]
    assert _heavy_modules_after(commands) == []


def test_help_does_not_even_import_pydantic() -> None:
    """--help loads typer only: command modules import the recipe model (pydantic, yaml, jinja2) lazily."""
    assert _heavy_modules_after([["--help"]], ("pydantic", "yaml", "jinja2", "rich", *HEAVY)) == []


def test_default_recipe_constant_matches() -> None:
    from mistral_deploy.cli._options import DEFAULT_RECIPE as cli_default
    from mistral_deploy.recipe import DEFAULT_RECIPE

    assert cli_default == DEFAULT_RECIPE
