"""`mistral-deploy status`: re-probe deployments; `--ip` like `sky status --ip`."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._output import Output


@app.command()
def status(
    name: Annotated[Optional[str], typer.Argument(help="A deployment (default: all of them).")] = None,
    ip: Annotated[bool, typer.Option("--ip", help="Print only the endpoint's IP address.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Show deployments and re-probe their health (the gateway's /health). Exit 5: no such deployment."""
    from mistral_deploy.backends import backend_named
    from mistral_deploy.errors import MistralDeployError
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    store = StateStore()
    deployments = [store.load(name)] if name else store.list()
    if ip and not name and len(deployments) != 1:
        names = ", ".join(d.name for d in deployments) or "none"
        raise MistralDeployError(f"--ip needs one deployment; name it (deployments: {names})")
    rows: list[dict[str, Any]] = []
    for deployment in deployments:
        try:
            backend = backend_named(deployment.backend)
            rows.append(backend.status(deployment, store) if deployment.backend == "serve"
                        else backend.status(deployment))
        except MistralDeployError as exc:
            rows.append({"name": deployment.name, "backend": deployment.backend, "phase": deployment.phase,
                         "healthy": False, "endpoint": deployment.endpoint, "ip": None, "error": exc.message})
    if name and not ip:
        _add_token_cost(deployments[0], rows[0], store)
    if ip:
        if not rows[0].get("ip"):
            raise MistralDeployError(f"{rows[0]['name']} has no IP address yet (phase {rows[0]['phase']})")
        out.data(str(rows[0]["ip"]))
        return
    services = [(d, row) for d, row in zip(deployments, rows) if d.backend == "serve"]
    controller = None
    if services:
        # one SkyServe controller for all of a user's services: shown once, apart; each service's price is
        # its replicas'
        from mistral_deploy.cli.commands._lifecycle import services_recorded
        from mistral_deploy.converge import serve_controller

        controller = serve_controller(services[0][0].recipe_model(), services_recorded(store))
        for deployment, row in services:
            row.setdefault("hourly_price", deployment.details.get("hourly_price"))
            row["serve_controller"] = controller.to_json()
    if json_out:
        out.json(rows[0] if name else {"deployments": rows})
        return
    if not rows:
        out.info("no deployments; create one with `mistral-deploy up`")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    from mistral_deploy.cli.commands._lifecycle import format_left

    for column in ("NAME", "BACKEND", "PHASE", "HEALTHY", "ENDPOINT", "IP", "ENDS IN", "COST"):
        table.add_column(column)
    for row in rows:
        ends = "-"
        if row.get("time_left_seconds") is not None:
            ends = format_left(row["time_left_seconds"])
        elif row["backend"] == "cloud":
            ends = "never"  # no TTL: it runs, and costs, until `down`
        cost = f"${row['cost_so_far']:.2f}" if row.get("cost_so_far") is not None else "-"
        if row.get("usd_per_mtok") is not None:
            cost += f" (${row['usd_per_mtok']:.2f}/Mtok)"
        table.add_row(row["name"], row["backend"], row["phase"], "yes" if row["healthy"] else "no",
                      row.get("endpoint") or "-", row.get("ip") or "-", ends, cost)
    out.print(table)
    from rich.markup import escape

    for row in rows:
        if row.get("error"):
            out.info(f"{row['name']}: {row['error']}")
        if row.get("warning"):
            out.warn(escape(f"{row['name']}: {row['warning']}"))
    if controller is not None:
        out.info(escape(controller.line()))


def _add_token_cost(deployment: Any, row: dict[str, Any], store: Any) -> None:
    """For one priced, running deployment: the tokens it served so far and what a million cost (its usage
    records, read where it runs). Left out, not an error, when the records cannot be read now."""
    if row.get("phase") != "ready" or not row.get("hourly_price"):
        return
    from mistral_deploy import observe
    from mistral_deploy.errors import MistralDeployError

    try:
        samples = [source.sample(deployment.created_at) for source in observe.sources(deployment, store)]
    except MistralDeployError:
        return
    report = observe.usage_report(deployment, samples, deployment.created_at)
    row["tokens_so_far"] = report["prompt_tokens"] + report["completion_tokens"]
    row["usd_per_mtok"] = report["usd_per_mtok"]

