"""`mistral-deploy ttl NAME 2h`: a running cloud endpoint ends that long from now (longer or shorter than
before); `ttl NAME none` removes its end time. SkyPilot's autodown, set again on the cluster."""

from __future__ import annotations

from typing import Annotated

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output


@app.command()
def ttl(
    name: Annotated[str, typer.Argument(help="A deployment on a cloud (one VM).")],
    duration: Annotated[str, typer.Argument(help="From now: 30m, 2h, 1d; none: no end time.")],
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Set when a cloud endpoint tears itself down, counted from now. Exit 3: not a duration, or a
    deployment without a TTL (local, a service); 5: no such deployment; 9: the cloud refused."""
    import time

    from mistral_deploy.cloud import CloudBackend
    from mistral_deploy.cli.commands._lifecycle import lifetime_text
    from mistral_deploy.errors import RecipeError
    from mistral_deploy.progress import Progress
    from mistral_deploy.recipe import NO_TTL, parse_duration
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    seconds = None
    if duration.strip().lower() not in NO_TTL:
        try:
            seconds = parse_duration(duration)
        except ValueError as exc:
            raise RecipeError(f"DURATION: {exc}") from None
        if not isinstance(seconds, int) or seconds <= 0:
            raise RecipeError("DURATION: expected a duration such as 30m, 2h or 1d, or none")
    store = StateStore()
    with store.changing(name):
        deployment = store.load(name)
        if deployment.backend != "cloud":
            what = "runs on this machine, which ends it with `mistral-deploy down`" if deployment.backend == "local" \
                else "is a SkyServe service, whose replicas would be relaunched"
            raise RecipeError(f"{name} {what}: it has no TTL to set")
        progress = Progress()
        try:
            CloudBackend().set_ttl(deployment, seconds, store, progress)
        finally:
            progress.close()
    if json_out:
        ends_at = deployment.details.get("ends_at")
        out.json({"name": name, "ends_at": ends_at,
                  "time_left_seconds": max(0, round(ends_at - time.time())) if ends_at else None})
    else:
        out.data(f"{name} ends {lifetime_text(deployment)}")
