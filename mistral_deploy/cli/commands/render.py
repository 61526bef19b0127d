"""`mistral-deploy render`: the SkyPilot task (or SkyServe service) a recipe becomes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import (
    Allow, Cloud, Gpu, Model, Name, Network, Port, RecipeArg, Region, Spot, Ttl, load, overrides,
)
from mistral_deploy.cli._output import Output
from mistral_deploy.errors import MistralDeployError


@app.command()
def render(
    recipe: RecipeArg,
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
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Write task.yaml into this folder.")] = None,
) -> None:
    """Print the SkyPilot task YAML (secrets only as null `secrets:` entries), or write it with --out."""
    from mistral_deploy.fit import check_fit
    from mistral_deploy.render import dump_yaml, render_task

    loaded = load(recipe, overrides(cloud=cloud, gpu=gpu, region=region, model=model, name=name, spot=spot,
                                    network=network, allow=allow, ttl=ttl, port=port))
    check_fit(loaded.recipe)
    text = dump_yaml(render_task(loaded.recipe))
    output = Output()
    if out_dir is None:
        output.data(text)
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / ("service.yaml" if loaded.recipe.replicas else "task.yaml")
        tmp = target.with_suffix(".yaml.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    except OSError as exc:
        raise MistralDeployError(f"--out: cannot write {out_dir}: {exc.strerror}") from None
    output.info(f"wrote {target}")
