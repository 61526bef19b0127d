"""`mistral-deploy recipes`: the built-in recipes, and `recipes show NAME`."""

from __future__ import annotations

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import RecipeArg
from mistral_deploy.cli._output import Output

recipes_app = typer.Typer(help="List the built-in recipes, or show one.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def list_recipes(ctx: typer.Context) -> None:
    """One line per built-in recipe: name, model, GPU, description."""
    if ctx.invoked_subcommand is not None:
        return
    from mistral_deploy.recipe import builtin_recipe_names, load_recipe

    out = Output()
    rows = []
    for name in builtin_recipe_names():
        recipe = load_recipe(name).recipe
        gpu = ", ".join(str(g) for g in recipe.resources.gpu) or "-"
        rows.append((name, recipe.model.id, gpu, recipe.description or ""))
    width = max(len(r[0]) for r in rows)
    mwidth = max(len(r[1]) for r in rows)
    gwidth = max(len(r[2]) for r in rows)
    for name, model, gpu, desc in rows:
        out.data(f"{name:<{width}}  {model:<{mwidth}}  {gpu:<{gwidth}}  {desc}".rstrip())


@recipes_app.command("show")
def show(recipe: RecipeArg) -> None:
    """Print a recipe's YAML, comments included."""
    from mistral_deploy.recipe import load_recipe, resolve_recipe_path

    path, _ = resolve_recipe_path(recipe)
    load_recipe(recipe)  # a broken file is reported, not shown as if it were fine
    Output().data(path.read_text(encoding="utf-8"))
