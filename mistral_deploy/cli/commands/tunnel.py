"""`mistral-deploy tunnel`: a local port forwarded to a private cloud endpoint, over SkyPilot's SSH access."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output


@app.command()
def tunnel(
    name: Annotated[str, typer.Argument(help="A cloud deployment with network mode private.")],
    port: Annotated[
        Optional[int],
        typer.Option("--port", help="Local port (default: the one `up` recorded, shown by `status`/`env`)."),
    ] = None,
) -> None:
    """Forward 127.0.0.1:PORT to the private endpoint's gateway until Ctrl-C (ssh -N -L, SkyPilot's keys)."""
    from mistral_deploy.backends import backend_named
    from mistral_deploy.errors import MistralDeployError
    from mistral_deploy.state import StateStore

    out = Output()
    deployment = StateStore().load(name)
    if deployment.backend != "cloud":
        raise MistralDeployError(
            f"{name} is a {deployment.backend} deployment; `tunnel` is for cloud deployments with network private")
    backend = backend_named("cloud")
    open_tunnel = getattr(backend, "open_tunnel")
    with open_tunnel(deployment, local_port=port) as forwarded:
        scheme = (deployment.endpoint or "http://").split("://", 1)[0]
        url = f"{scheme}://127.0.0.1:{forwarded.local_port}/v1"
        out.data(url)
        out.info(f"forwarding {url} to {name}'s gateway over SSH; Ctrl-C ends it")
        if port and port != deployment.details.get("tunnel_port"):
            out.info(f"`mistral-deploy env {name}` names port {deployment.details.get('tunnel_port')}; "
                     f"use {url} here")
        try:
            code = forwarded.wait()
        except KeyboardInterrupt:
            out.info("tunnel closed")
            return
    if code:
        raise MistralDeployError(f"the SSH tunnel to {name} ended (ssh exit status {code})",
                                 hint=f"`mistral-deploy status {name}` shows whether the cluster is up")
