"""Options shared by several commands: the recipe argument and the flags that override it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mistral_deploy.recipe import DEFAULT_RECIPE, LoadedRecipe, Overrides, load_recipe

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
Ttl = Annotated[Optional[str], typer.Option("--ttl", help="Tear down after this long: 30m, 4h, 1d.")]
Port = Annotated[Optional[int], typer.Option("--port", help="Gateway port.")]


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
) -> Overrides:
    return Overrides(cloud=cloud, gpu=gpu, region=region, model=model, name=name, spot=spot,
                     network=network, allow=allow, ttl=ttl, port=port)


def load(recipe: str, flags: Overrides) -> LoadedRecipe:
    return load_recipe(recipe, flags)
