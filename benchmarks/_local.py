"""Shared by the benchmarks: a real local deployment (engine + gateway) in a throw-away state folder."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from mistral_deploy.skysdk import free_port  # noqa: F401  (the benchmarks import it from here)


@contextmanager
def state_home() -> Iterator[Path]:
    """A temporary MISTRAL_DEPLOY_HOME; the engine and the built model are the user's."""
    from mistral_deploy import engine

    python = engine.engine_python()  # from the real data dir, before it moves
    models = engine.models_dir()
    with tempfile.TemporaryDirectory(prefix="md-bench-") as tmp:
        saved = {k: os.environ.get(k) for k in ("MISTRAL_DEPLOY_HOME", "MISTRAL_DEPLOY_ENGINE_PYTHON",
                                                "MISTRAL_DEPLOY_MODELS_DIR")}
        os.environ.update(MISTRAL_DEPLOY_HOME=tmp, MISTRAL_DEPLOY_ENGINE_PYTHON=python,
                          MISTRAL_DEPLOY_MODELS_DIR=str(models))
        try:
            yield Path(tmp)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextmanager
def deployment(name: str = "bench", *, progress: Optional[object] = None, limits: Optional[dict] = None,
               keys: int = 1, guardrail: Optional[str] = None, **flags: object) -> Iterator[tuple]:
    """(deployment, api key, store) of a ready local tiny-mistral endpoint; taken down afterwards.
    `limits` replaces the recipe's `limits:` section (every limit stays on); `keys`: API keys to make;
    `guardrail`: the recipe's guardrail."""
    from mistral_deploy.local import LocalBackend
    from mistral_deploy.progress import Progress
    from mistral_deploy.recipe import Overrides, load_recipe, validate_recipe_data
    from mistral_deploy.state import StateStore

    loaded = load_recipe("tiny-mistral", Overrides(cloud="local", name=name, port=free_port(), **flags))
    recipe = loaded.recipe
    if limits or keys != 1 or guardrail:
        data = recipe.to_yaml_config()
        data["limits"] = limits or {}
        data["auth"] = {"keys": keys}
        if guardrail:
            data["guardrail"] = guardrail
        recipe = validate_recipe_data(data, loaded.source).recipe
    store = StateStore()
    backend = LocalBackend()
    quiet = Progress(quiet=True)
    deployed = backend.up(recipe, store, progress or quiet)  # type: ignore[arg-type]
    try:
        yield deployed, store.read_api_keys(name)[0], store
    finally:
        backend.down(store.load(name), store, quiet)
