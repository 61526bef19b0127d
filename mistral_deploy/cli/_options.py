"""Options shared by several commands: the recipe argument and the flags that override it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from mistral_deploy.recipe import LoadedRecipe, Overrides

# The recipe `up` uses when none is named. Kept here, not imported from recipe.py, so that `--help` does not
# import pydantic; tests/test_cli_speed.py checks it equals mistral_deploy.recipe.DEFAULT_RECIPE.
DEFAULT_RECIPE = "mistral-7b-instruct"

RecipeArg = Annotated[
    str,
    typer.Argument(help="A built-in recipe name (see `mistral-deploy recipes`) or a path to a recipe YAML file."),
]
OptionalRecipeArg = Annotated[
    str,
    typer.Argument(help=f"A built-in recipe name or a recipe YAML file. Default: {DEFAULT_RECIPE}."),
]
Cloud = Annotated[Optional[str], typer.Option("--cloud", help="aws, gcp, azure, kubernetes, ... or local.")]
Gpu = Annotated[Optional[str], typer.Option("--gpu", help="GPU as NAME[:COUNT], e.g. A10G or A100:2.")]
Region = Annotated[Optional[str], typer.Option("--region", help="Cloud region.")]
Model = Annotated[Optional[str], typer.Option("--model", help="Hugging Face model id or local path.")]
Name = Annotated[Optional[str], typer.Option("--name", help="Deployment name.")]
Spot = Annotated[Optional[bool], typer.Option("--spot/--on-demand", help="Use spot instances.", show_default=False)]
Network = Annotated[Optional[str], typer.Option("--network", help="public, private or vpc.")]
Allow = Annotated[
    Optional[list[str]], typer.Option("--allow", help="Allowed source CIDR (repeatable); replaces the recipe's list.")
]
Ttl = Annotated[Optional[str], typer.Option("--ttl", help="Tear down after this long: 30m, 4h, 1d; none: never.")]
Port = Annotated[Optional[int], typer.Option("--port", help="Gateway port.")]
Nodes = Annotated[Optional[int], typer.Option("--nodes", help="Machines the engine spans, for a model larger than "
                                                               "one node (pipeline parallelism across them).")]


def overrides(
    *,
    cloud: Optional[str] = None,
    gpu: Optional[str] = None,
    region: Optional[str] = None,
    model: Optional[str] = None,
    name: Optional[str] = None,
    spot: Optional[bool] = None,
    network: Optional[str] = None,
    allow: Optional[list[str]] = None,
    ttl: Optional[str] = None,
    port: Optional[int] = None,
    nodes: Optional[int] = None,
) -> Overrides:
    from mistral_deploy.recipe import Overrides

    return Overrides(cloud=cloud, gpu=gpu, region=region, model=model, name=name, spot=spot,
                     network=network, allow=allow, ttl=ttl, port=port, nodes=nodes)


def load(recipe: str, flags: Overrides) -> LoadedRecipe:
    from mistral_deploy.recipe import load_recipe

    return load_recipe(recipe, flags)
