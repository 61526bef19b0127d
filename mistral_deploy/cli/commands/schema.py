"""`mistral-deploy schema`: the recipe's JSON Schema, for editor completion."""

from __future__ import annotations

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (mistral-deploy schema > recipe.schema.json)."""
    from mistral_deploy.recipe import json_schema

    Output().json(json_schema())


@app.command("exit-codes")
def exit_codes() -> None:
    """List the exit codes every command uses."""
    from mistral_deploy.errors import EXIT_CODES

    out = Output()
    for code, meaning in sorted(EXIT_CODES.items()):
        out.data(f"{code:>3}  {meaning}")
