"""`mistral-deploy up`: bring a recipe up as an endpoint, and return once it really answers."""

from __future__ import annotations

from typing import Annotated

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import (
    DEFAULT_RECIPE, Allow, Cloud, Gpu, Model, Name, Network, OptionalRecipeArg, Port, Region, Spot, Ttl, load,
    overrides,
)
from mistral_deploy.cli._output import Output

JsonFlag = Annotated[bool, typer.Option("--json", help="One JSON object on stdout (progress stays on stderr).")]


@app.command()
def up(
    recipe: OptionalRecipeArg = DEFAULT_RECIPE,
    cloud: Cloud = None,
    gpu: Gpu = None,
    region: Region = None,
    model: Model = None,
    name: Name = None,
    spot: Spot = None,
    network: Network = None,
    allow: Allow = None,
    ttl: Ttl = None,
    port: Port = None,
    json_out: JsonFlag = False,
) -> None:
    """Create the endpoint (`--cloud local`: on this machine) and wait until an authenticated one-token
    completion succeeds. Exit 6: name taken; 7: local engine/gateway; 8: not ready; 9: cloud refused."""
    from mistral_deploy.backends import backend_for_recipe
    from mistral_deploy.cli.commands._lifecycle import sigterm_as_interrupt, summary, usage_lines
    from mistral_deploy.progress import Progress
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    loaded = load(recipe, overrides(cloud=cloud, gpu=gpu, region=region, model=model, name=name, spot=spot,
                                    network=network, allow=allow, ttl=ttl, port=port))
    for caution in loaded.recipe.cautions():
        out.warn(caution)
    progress = Progress()
    try:
        with sigterm_as_interrupt():
            deployment = backend_for_recipe(loaded.recipe).up(loaded.recipe, StateStore(), progress)
    finally:
        progress.close()
    if json_out:
        out.json(summary(deployment))
    else:
        out.data("\n".join(usage_lines(deployment)))
