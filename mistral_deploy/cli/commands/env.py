"""`mistral-deploy env`: the variables an OpenAI client needs, as shell exports."""

from __future__ import annotations

import shlex
from typing import Annotated, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output


@app.command()
def env(
    name: Annotated[str, typer.Argument(help="A deployment.")],
    key: Annotated[Optional[str], typer.Option("--key", help="The id of the key to export (default: the first; "
                                                            "see `mistral-deploy keys list`).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="A JSON object instead of shell exports.")] = False,
) -> None:
    """Print OPENAI_BASE_URL and OPENAI_API_KEY exports (and the pinned CA file with TLS):
    eval "$(mistral-deploy env NAME)". Exit 5: no such deployment."""
    from mistral_deploy.cli.commands._lifecycle import client_env
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    store = StateStore()
    variables = client_env(store.load(name), store, key_id=key)
    if json_out:
        out.json(variables)
        return
    lines = []
    if "SSL_CERT_FILE" in variables:
        lines.append("# TLS: clients in this shell trust the system's CAs plus the endpoint's own certificate, which "
                     "can vouch for the endpoint's addresses only (MISTRAL_DEPLOY_CA_FILE alone pins it)")
    lines += [f"export {key}={shlex.quote(value)}" for key, value in variables.items()]
    out.data("\n".join(lines))
