"""`mistral-deploy validate`: check a recipe, and whether the model fits its GPUs."""

from __future__ import annotations

from mistral_deploy.cli import app
from mistral_deploy.cli._options import (Cloud, Gpu, Model, Network, Nodes, RecipeArg, Region, Spot, Ttl, load,
                                         overrides)
from mistral_deploy.cli._output import Output


@app.command()
def validate(
    recipe: RecipeArg,
    cloud: Cloud = None,
    gpu: Gpu = None,
    nodes: Nodes = None,
    region: Region = None,
    model: Model = None,
    spot: Spot = None,
    network: Network = None,
    ttl: Ttl = None,
) -> None:
    """Validate a recipe (with any overrides) and estimate GPU memory. Exit 3: invalid; exit 4: does not fit."""
    from mistral_deploy.fit import architecture_of, cautions, check_fit

    out = Output()
    loaded = load(recipe, overrides(cloud=cloud, gpu=gpu, nodes=nodes, region=region, model=model, spot=spot,
                                    network=network, ttl=ttl))
    estimates = check_fit(loaded.recipe)
    out.data(f"{loaded.source}: valid")
    for est in estimates:
        out.data(f"  {est.summary()}")
    for caution in cautions(loaded.recipe):
        out.warn(caution)
    if loaded.recipe.resources.gpu and architecture_of(loaded.recipe) is None:
        out.warn(f"no fit estimate: {loaded.recipe.model.id} is not a known model; set model.architecture")
