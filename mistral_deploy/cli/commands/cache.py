"""`mistral-deploy cache RECIPE --to s3://BUCKET/PREFIX`: the model's weights from the Hub into a bucket in
the endpoint's region, once; the recipe then streams them from there (`model.source`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import Model, RecipeArg, load, overrides
from mistral_deploy.cli._output import Output


@app.command()
def cache(
    recipe: RecipeArg,
    to: Annotated[str, typer.Option("--to", help="Where: s3://BUCKET/PREFIX (S3-compatible stores: AWS_ENDPOINT_URL).")],
    revision: Annotated[Optional[str], typer.Option(
        "--revision", help="Hub branch, tag or commit; default: the recipe's model.revision, else the default branch.")] = None,
    model: Model = None,
    recipe_out: Annotated[Optional[Path], typer.Option(
        "--recipe-out", help="Write the recipe with model.source and model.revision set to this file.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Fetch the recipe's model from the Hugging Face Hub (HF_TOKEN for a gated one) at one exact commit,
    upload what the engine streams (configs, tokenizer, model*.safetensors) and a manifest naming that
    commit. Then set model.source (and model.revision: the commit) in the recipe: the engine streams
    the weights from the bucket with no Hub token. Exit 3: bad recipe or URL; 9: the Hub or the store refused."""
    import yaml

    from mistral_deploy.errors import RecipeError
    from mistral_deploy.recipe import SOURCE_RE, validate_recipe_data
    from mistral_deploy.weights import cache as fill

    out = Output(json_mode=json_out)
    if not SOURCE_RE.match(to.rstrip("/")):
        raise RecipeError(f"--to: expected s3://BUCKET/PREFIX, got {to!r}")
    loaded = load(recipe, overrides(model=model))
    cached = fill(loaded.recipe, to, revision=revision, say=out.info)

    data = loaded.recipe.to_yaml_config()
    data["model"]["source"] = cached.source
    if cached.commit:
        data["model"]["revision"] = cached.commit
    else:
        data["model"].pop("revision", None)
    validate_recipe_data(data, "the cached recipe")  # what it writes loads
    if recipe_out is not None:
        recipe_out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    if json_out:
        out.json({"source": cached.source, "model": cached.repo, "commit": cached.commit, "files": cached.files,
                  "bytes": cached.total_bytes, "recipe_out": str(recipe_out) if recipe_out else None})
        return
    at = f" at {cached.commit}" if cached.commit else " (built here)"
    out.data(f"cached {cached.repo}{at} in {cached.source}: {len(cached.files)} files, "
             f"{cached.total_bytes / 1e9:.2f} GB")
    out.data("in the recipe:" if recipe_out is None else f"wrote {recipe_out}, with:")
    out.data(f"  model:\n    source: {cached.source}" + (f"\n    revision: {cached.commit}" if cached.commit else ""))
