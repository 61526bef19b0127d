"""`mistral-deploy up`: bring a recipe up as an endpoint, and return once it really answers.

Declarative: on a deployment that exists, `up` compares the recorded recipe with the asked one, shows
what changes and what each change costs, and applies it the cheapest way that keeps the endpoint up
(mistral_deploy.converge). The same recipe again changes nothing: it re-probes and prints the endpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import (
    DEFAULT_RECIPE, Allow, Cloud, Gpu, Model, Name, Network, Nodes, OptionalRecipeArg, Port, Region, Spot, Ttl,
    load, overrides,
)
from mistral_deploy.cli._output import Output

if TYPE_CHECKING:
    from mistral_deploy.recipe import Recipe
    from mistral_deploy.state import Deployment, StateStore

JsonFlag = Annotated[bool, typer.Option("--json", help="One JSON object on stdout (progress stays on stderr).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what would change, and its cost; change nothing.")]


@app.command()
def up(
    recipe: OptionalRecipeArg = DEFAULT_RECIPE,
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
    dry_run: DryRun = False,
    json_out: JsonFlag = False,
) -> None:
    """Create the endpoint (`--cloud local`: on this machine) and wait until an authenticated one-token
    completion succeeds. On an existing deployment: show the changes and apply them (a gateway reload,
    an engine restart, a new cluster), or, with nothing changed, re-probe it. Exit 7: local
    engine/gateway; 8: not ready; 9: cloud refused."""
    from mistral_deploy.errors import DeploymentNotFound
    from mistral_deploy.fit import cautions
    from mistral_deploy.state import StateStore

    out = Output(json_mode=json_out)
    loaded = load(recipe, overrides(cloud=cloud, gpu=gpu, nodes=nodes, region=region, model=model, name=name,
                                    spot=spot, network=network, allow=allow, ttl=ttl, port=port))
    asked = loaded.recipe
    for caution in cautions(asked):
        out.warn(caution)
    store = StateStore()
    try:
        existing = store.load(asked.name)
    except DeploymentNotFound:
        existing = None
    commit = None
    if asked.model.source:  # the commit its bucket holds, checked against the recipe and the deployment
        from mistral_deploy.weights import source_commit

        # what it served from this same bucket (a commit from elsewhere, the Hub, is no reference)
        same = existing is not None and existing.recipe.get("model", {}).get("source") == asked.model.source
        commit = source_commit(asked, existing.details.get("model_commit") if same else None, say=out.warn)
    if existing is None:
        if dry_run:
            _report_creation(out, asked, store, json_out)
            return
        _create(out, asked, store, json_out, commit=commit)
    else:
        _converge(out, existing, asked, store, dry_run=dry_run, json_out=json_out, commit=commit)


def _record_commit(store: "StateStore", deployment: "Deployment", commit: "str | None") -> None:
    """With a bucket source, the exact commit it holds (or none known): what the deployment serves. (A
    Hub model's commit is recorded by the backend that saw it downloaded.)"""
    if not deployment.recipe_model().model.source or deployment.details.get("model_commit") == commit:
        return
    if commit:
        deployment.details["model_commit"] = commit
    else:
        deployment.details.pop("model_commit", None)
    store.save(deployment)


def _report_creation(out: Output, recipe: "Recipe", store: "StateStore", json_out: bool) -> None:
    from mistral_deploy.backends import backend_for_recipe
    from mistral_deploy.cli.commands._lifecycle import services_recorded
    from mistral_deploy.converge import estimate_price, serve_controller

    price = estimate_price(recipe)  # a service: its replicas; the controller it shares is apart
    kind = backend_for_recipe(recipe).kind
    controller = serve_controller(recipe, services_recorded(store, including=recipe.name)) if kind == "serve" else None
    if json_out:
        out.json({"name": recipe.name, "backend": kind, "changed": True, "effect": "create", "changes": [],
                  "price_per_hour": {"before": None, "after": price},
                  "serve_controller": controller.to_json() if controller else None, "dry_run": True})
        return
    where = "on this machine" if recipe.is_local else "as a SkyServe service" if kind == "serve" else "on a new cluster"
    cost = ""
    if price:
        cost = f", about ${price:.2f}/hour" + (" for its replicas" if controller else "")
    out.data(f"{recipe.name}: would be created {where}{cost}" + (f"\n+ {controller.line()}" if controller else ""))


def _create(out: Output, recipe: "Recipe", store: "StateStore", json_out: bool, *, commit: "str | None") -> None:
    from mistral_deploy.backends import backend_for_recipe
    from mistral_deploy.cli.commands._lifecycle import sigterm_as_interrupt, summary, usage_lines
    from mistral_deploy.progress import Progress

    progress = Progress()
    try:
        with sigterm_as_interrupt():
            deployment = backend_for_recipe(recipe).up(recipe, store, progress)
    finally:
        progress.close()
    _record_commit(store, deployment, commit)
    if json_out:
        out.json(summary(deployment))
    else:
        out.data("\n".join(usage_lines(deployment)))


def _converge(out: Output, existing: "Deployment", asked: "Recipe", store: "StateStore", *, dry_run: bool,
              json_out: bool, commit: "str | None" = None) -> None:
    from mistral_deploy.backends import backend_named
    from mistral_deploy.cli.commands._lifecycle import services_recorded, sigterm_as_interrupt, summary, usage_lines
    from mistral_deploy.converge import diff, estimate_price, serve_controller
    from mistral_deploy.errors import DeploymentExists, MistralDeployError
    from mistral_deploy.progress import Progress

    name = existing.name
    with store.changing(name):
        existing = store.load(name)  # as it is now that no other change runs
        if existing.phase == "creating":
            raise DeploymentExists(f"{name} is still being created (or the `up` that created it was interrupted)",
                                   hint=f"wait for it, or `mistral-deploy down {name}` and up again")
        plan = diff(existing.recipe_model(), asked, existing.backend)
        plan.price_before = existing.details.get("hourly_price")
        moves = plan.needs("new-cluster") or plan.needs("service-update")
        plan.price_after = estimate_price(asked) if moves else plan.price_before
        if moves and existing.backend == "serve":
            plan.controller = serve_controller(asked, services_recorded(store))
        backend = backend_named(existing.backend)
        if dry_run:
            repair = None
            if not plan.changes:
                status = backend.status(existing)
                if not status.get("healthy"):
                    repair = status.get("error") or f"phase {status.get('phase')}, not answering"
            if json_out:
                out.json({**plan.to_json(), "dry_run": True, "repair": repair})
            else:
                lines = plan.lines()
                if repair:
                    lines = [f"{name}: no change to the recipe, but it does not answer ({repair}); `up` would "
                             f"start it again"]
                out.data("\n".join(lines))
            return
        progress = Progress()
        result: dict[str, Any] = {}
        try:
            with sigterm_as_interrupt():
                if plan.changes:
                    if not json_out:
                        out.data("\n".join(plan.lines()))
                    deployment = backend.apply(existing, asked, plan, store, progress)
                else:
                    status = backend.status(existing)
                    if status.get("healthy"):
                        deployment = existing
                        result["unchanged"] = True
                        progress.done(f"{name}: no change; it answers at {existing.endpoint}")
                    elif existing.backend == "cloud" and status.get("phase") == "gone":
                        # its cluster vanished (its TTL, `sky down`, the cloud): made again, with the same keys
                        progress.phase("repair", f"cluster {status.get('cluster')} is gone: launching it again "
                                                 f"(a new address; the same keys)")
                        keys = store.read_keys(name)
                        served = existing.details.get("model_commit")  # the same recipe: the same weights
                        store.remove(name)
                        deployment = backend.up(asked, store, progress, keys=keys,  # type: ignore[call-arg]
                                                model_commit=served)
                        result["recreated"] = True
                    else:
                        # drift: the same recipe, but it does not answer (the engine died, the job ended)
                        why = status.get("error") or f"phase {status.get('phase')}, not answering"
                        progress.phase("repair", why)
                        try:
                            deployment = backend.apply(existing, asked, plan, store, progress)
                        except MistralDeployError as exc:
                            exc.hint = exc.hint or why
                            raise
        finally:
            progress.close()
        _record_commit(store, deployment, commit)
    if json_out:
        out.json({**summary(deployment), "plan": plan.to_json(), **result})
    else:
        out.data("\n".join(usage_lines(deployment)))
