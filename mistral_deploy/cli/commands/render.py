"""`mistral-deploy render`: the SkyPilot task (or SkyServe service) a recipe becomes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import (
    Allow, Cloud, Gpu, Model, Name, Network, Nodes, Port, RecipeArg, Region, Spot, Ttl, load, overrides,
)
from mistral_deploy.cli._output import Output
from mistral_deploy.errors import MistralDeployError


@app.command()
def render(
    recipe: RecipeArg,
    cloud: Cloud = None,
    gpu: Gpu = None,
    nodes: Nodes = None,
    region: Region = None,
    model: Model = None,
    name: Name = None,
    spot: Spot = None,
    network: Network = None,
    allow: Allow = None,
    ttl: Ttl = None,
    port: Port = None,
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--out", help="Write task.yaml (service.yaml with replicas) into this folder, and config.yaml "
                                   "when SkyPilot needs global config (VPC settings)."),
    ] = None,
) -> None:
    """Print the SkyPilot task YAML (secrets only as null `secrets:` entries), or write it with --out."""
    from mistral_deploy.fit import check_fit
    from mistral_deploy.render import cloud_config, dump_yaml, render_task

    loaded = load(recipe, overrides(cloud=cloud, gpu=gpu, nodes=nodes, region=region, model=model, name=name,
                                    spot=spot, network=network, allow=allow, ttl=ttl, port=port))
    check_fit(loaded.recipe)
    files = {("service.yaml" if loaded.recipe.replicas else "task.yaml"): dump_yaml(render_task(loaded.recipe))}
    config = cloud_config(loaded.recipe)
    if config:
        files["config.yaml"] = dump_yaml(config)
    output = Output()
    if out_dir is None:
        output.data(next(iter(files.values())))
        if config:
            output.info("launch it with this SkyPilot config, which is not a task field: " + ", ".join(_flatten(config)))
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for filename, text in files.items():
            target = out_dir / filename
            tmp = target.with_suffix(".yaml.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
            output.info(f"wrote {target}")
    except OSError as exc:
        raise MistralDeployError(f"--out: cannot write {out_dir}: {exc.strerror}") from None


def _flatten(config: dict[str, object], prefix: str = "") -> list[str]:
    """{'aws': {'use_internal_ips': True}} -> ['aws.use_internal_ips=true'] (the `sky --config` form)."""
    import json

    items: list[str] = []
    for key, value in config.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items
