"""`mistral-deploy schema`: the recipe's JSON Schema, for editor completion."""

from __future__ import annotations

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema (mistral-deploy schema > recipe.schema.json)."""
    from mistral_deploy.recipe import json_schema

    Output().json(json_schema())

