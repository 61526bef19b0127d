"""`mistral-deploy down`: stop a deployment (or all of them) and forget it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output


@app.command()
def down(
    name: Annotated[Optional[str], typer.Argument(help="A deployment.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every recorded deployment.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Stop the engine and gateway (locally) or remove the cluster/service, then the record.
    Never prompts. Exit 5: no such deployment; 9: the cloud refused (the record is kept)."""
    from mistral_deploy.errors import MistralDeployError
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    if bool(name) == every:
        raise MistralDeployError("name one deployment, or pass --all")
    store = StateStore()
    targets = store.list() if every else [store.load(name)]  # type: ignore[arg-type]
    removed, failed = teardown(targets, store)
    if json_out:
        out.json({"removed": removed, "failed": failed})
    elif every and not targets:
        out.info("no deployments")
    if failed:
        first = next(iter(failed.values()))
        raise MistralDeployError(f"could not remove {', '.join(failed)}: {first}",
                                 hint="the records are kept; run `mistral-deploy down` again")


def teardown(targets: list, store) -> tuple[list[str], dict[str, str]]:  # type: ignore[no-untyped-def,type-arg]
    """Down each deployment; one failing does not stop the others. (removed names, {name: error})."""
    from mistral_deploy.backends import backend_named
    from mistral_deploy.errors import MistralDeployError
    from mistral_deploy.progress import Progress

    removed: list[str] = []
    failed: dict[str, str] = {}
    for deployment in targets:
        progress = Progress()
        try:
            backend_named(deployment.backend).down(deployment, store, progress)
            removed.append(deployment.name)
        except MistralDeployError as exc:
            progress.fail(f"{deployment.name}: {exc.message}")
            failed[deployment.name] = exc.message
        finally:
            progress.close()
    return removed, failed
