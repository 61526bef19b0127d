"""`mistral-deploy recipes`: the built-in recipes, and `recipes show NAME`."""

from __future__ import annotations

from typing import Annotated

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import RecipeArg
from mistral_deploy.cli._output import Output

recipes_app = typer.Typer(help="List the built-in recipes, or show one.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


JsonFlag = Annotated[bool, typer.Option("--json", help="One object per recipe, as JSON.")]
# Families in the order `recipes` lists them: today's first; any other after these, by name.
FAMILIES = ("Ministral 3", "Mistral Small", "Magistral", "Devstral", "Mistral Large", "Mistral Nemo", "Mixtral",
            "Mistral 7B", "Test")


@recipes_app.callback()
def list_recipes(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """The built-in recipes by model family: name, model, size, licence, the smallest GPU set that fits."""
    if ctx.invoked_subcommand is not None:
        return
    from mistral_deploy.fit import architecture_of, describe_size, smallest_fit
    from mistral_deploy.recipe import builtin_recipe_names, load_recipe

    out = Output(json_mode=json_out)
    rows = []
    for name in builtin_recipe_names():
        recipe = load_recipe(name).recipe
        arch = architecture_of(recipe)
        licence = recipe.model.license or "see the model card"
        rows.append({
            "name": name, "family": recipe.model.family or "Other", "model": recipe.model.id,
            "size": describe_size(arch) if arch else "?", "license": licence, "gated": recipe.model.hf_token,
            "smallest_fit": "CPU (local)" if recipe.is_local else smallest_fit(recipe) or "?",
            "gpu": [str(g) for g in recipe.resources.gpu], "description": recipe.description or "",
        })
    order = {family: i for i, family in enumerate(FAMILIES)}
    rows.sort(key=lambda r: (order.get(r["family"], len(order)), r["family"]))  # stable: by name within
    if json_out:
        out.json(rows)
        return
    cells = [(r["name"], r["model"], r["size"], r["license"] + (" (gated)" if r["gated"] else ""),
              r["smallest_fit"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    family = None
    for row, cell in zip(rows, cells):
        if row["family"] != family:
            family = row["family"]
            out.data(f"{family}:")
        out.data("  " + "  ".join(f"{c:<{w}}" for c, w in zip(cell, widths)) + f"  fits {cell[4]}")


@recipes_app.command("show")
def show(recipe: RecipeArg) -> None:
    """Print a recipe's YAML, comments included."""
    from mistral_deploy.recipe import load_recipe, resolve_recipe_path

    path, _ = resolve_recipe_path(recipe)
    load_recipe(recipe)  # a broken file is reported, not shown as if it were fine
    Output().data(path.read_text(encoding="utf-8"))
