"""`mistral-deploy logs`: the engine's log (locally, or the job's log on the cluster)."""

from __future__ import annotations

from typing import Annotated

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="A deployment.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many of the last lines to show.")] = 100,
) -> None:
    """Print the engine's log lines. Exit 5: no such deployment."""
    from mistral_deploy.backends import backend_named
    from mistral_deploy.state import StateStore

    out = Output()
    deployment = StateStore().load(name)
    try:
        for line in backend_named(deployment.backend).logs(deployment, follow=follow, lines=lines):
            out.data(line)
    except KeyboardInterrupt:
        return
