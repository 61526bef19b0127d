"""`mistral-deploy plan`: does the model fit, and what would it cost, cheapest first.

Prices come from SkyPilot's own catalog (mistral_deploy.pricing); this is the one command that imports it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated

import typer

from mistral_deploy.cli import app
from mistral_deploy.cli._options import Cloud, Gpu, Nodes, RecipeArg, Region, Spot, load, overrides
from mistral_deploy.cli._output import Output

if TYPE_CHECKING:
    from mistral_deploy.converge import ServeController
    from mistral_deploy.fit import FitEstimate
    from mistral_deploy.pricing import Offer
    from mistral_deploy.recipe import GpuRequest, Recipe

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the estimate and the offers as JSON.")]
AllFlag = Annotated[
    bool, typer.Option("--all", help="List every instance type, not only the cheapest per cloud, region and GPU.")
]


@app.command()
def plan(
    recipe: RecipeArg,
    gpu: Gpu = None,
    nodes: Nodes = None,
    cloud: Cloud = None,
    region: Region = None,
    spot: Spot = None,
    json_out: JsonFlag = False,
    every: AllFlag = False,
) -> None:
    """Check that the model fits, then list GPU offers cheapest first: $/h on-demand and spot, est. $/month.

    Prices are read from SkyPilot's catalog for aws, gcp and azure (or --cloud). Exit 4: does not fit.
    """
    from mistral_deploy import pricing
    from mistral_deploy.errors import RecipeError
    from mistral_deploy.fit import ESTIMATE_SOURCE, architecture_of, check_fit, decode_ceiling, estimate
    from mistral_deploy.recipe import LOCAL_CLOUD

    out = Output(json_mode=json_out)
    loaded = load(recipe, overrides(cloud=cloud, gpu=gpu, nodes=nodes, region=region, spot=spot))
    r = loaded.recipe
    if not r.resources.gpu:
        raise RecipeError(f"{loaded.source}: resources.gpu: plan needs a GPU to price; pass --gpu, e.g. --gpu A10G")
    check_fit(r)  # exit 4, with what would fit, when no candidate does
    arch = architecture_of(r)
    estimates = {str(g): estimate(r, g, arch) if arch else None for g in r.resources.gpu}
    # price the candidates that fit, and those we cannot judge (unknown model or GPU)
    candidates = [g for g in r.resources.gpu if estimates[str(g)] is None or estimates[str(g)].fits]

    named = r.resources.clouds
    if named in ([], [LOCAL_CLOUD]):
        clouds = list(pricing.PRICED_CLOUDS)  # the local backend has no price: show what the clouds charge
    elif set(named) & set(pricing.PRICED_CLOUDS):
        clouds = [c for c in named if c in pricing.PRICED_CLOUDS]  # the others have no price list
    else:
        where = "--cloud" if cloud else "resources.cloud"
        raise RecipeError(
            f"{loaded.source}: {where}: plan prices {', '.join(pricing.PRICED_CLOUDS)}; "
            f"{', '.join(named)} {'has' if len(named) == 1 else 'have'} no price catalog"
        )
    use_spot = r.resources.spot
    replicas = max(1, r.replicas.min) if r.replicas is not None else 1

    pricing.ensure_catalogs(clouds, say=out.info)  # a catalog never fetched here: once, with a timeout
    nodes = r.resources.num_nodes
    found = [dataclasses.replace(o, nodes=nodes) for o in pricing.offers_for(r.resources, candidates, clouds)]
    offers = pricing.cheapest_first(found, spot=use_spot) if every else pricing.cheapest_per_region(found, spot=use_spot)
    if not offers:
        regions = sorted({r.resources.region_for(c) for c in clouds} - {None})
        where = f" in {', '.join(regions)}" if regions else ""
        raise RecipeError(
            f"{loaded.source}: no offer for {', '.join(str(g) for g in candidates)} on {', '.join(clouds)}{where} "
            "in SkyPilot's catalog; try another --gpu, --cloud or --region"
        )

    ceilings = {str(g): decode_ceiling(r, g) for g in candidates}
    variants = _variants(r, clouds, use_spot) if loaded.source.startswith("built-in") else []
    controller = _serve_controller(r, offers[0]) if r.replicas is not None else None
    if json_out:
        out.json({
            "recipe": r.name,
            "source": loaded.source,
            "model": r.model.id,
            "spot": use_spot,
            "replicas": replicas,
            "hours_per_month": pricing.HOURS_PER_MONTH,
            "clouds": clouds,
            "estimates": [_estimate_json(g, estimates[str(g)]) for g in r.resources.gpu],
            "offers": [{**o.to_json(spot=use_spot, replicas=replicas),
                        "usd_per_mtok_output_floor": _round(_per_mtok(o, ceilings, use_spot))}
                       for o in offers],
            "throughput_estimate": {"output_tokens_per_s_ceiling": {g: _round(t) for g, t in ceilings.items()},
                                    "source": ESTIMATE_SOURCE},
            "variants": variants,
            "serve_controller": controller.to_json() if controller else None,
        })
        return
    _print_plan(out, r, loaded.source, estimates, offers, use_spot=use_spot, replicas=replicas, ceilings=ceilings)
    if controller is not None:
        out.data(f"+ {controller.line()}")
    if variants:
        _print_variants(out, r.name, variants)
    out.info(f"$/Mtok out (floor): the offer's price over the most output tokens/s its GPUs can decode "
             f"({ESTIMATE_SOURCE})")
    if arch is None:
        out.warn(f"no fit estimate: {r.model.id} is not a known model; set model.architecture")


# Built-in recipes that serve the same model (the quantized ones on cheaper GPUs): `plan` shows them beside
# one another, with their price.
VARIANTS: tuple[tuple[str, ...], ...] = (
    ("mistral-7b-instruct", "mistral-7b-instruct-awq", "mistral-7b-instruct-gptq"),
    ("mistral-large-3", "mistral-large-3-nvfp4", "mistral-large-3-2-nodes"),
)


def _serve_controller(recipe: "Recipe", cheapest: "Offer") -> "ServeController":
    """SkyServe's controller for a service of this recipe, priced where its cheapest offer is: shared by every
    service, so not in the offers' prices (nor their $/Mtok)."""
    from mistral_deploy import pricing
    from mistral_deploy.converge import ServeController
    from mistral_deploy.cli.commands._lifecycle import services_recorded
    from mistral_deploy.state import StateStore

    services = services_recorded(StateStore(), including=recipe.name)
    if pricing.serve_consolidation_mode():
        return ServeController(price=None, consolidated=True, services=services)
    price = pricing.controller_price(cheapest.cloud, cheapest.region)
    return ServeController(price=None if price is None else round(price, 4), consolidated=False, services=services)


def _round(value: "float | None", digits: int = 3) -> "float | None":
    return None if value is None else round(value, digits)


def _per_mtok(offer: "Offer", ceilings: dict[str, "float | None"], spot: bool) -> "float | None":
    """$ per million output tokens at the estimated ceiling: a floor on what the offer's tokens cost (with
    replicas, price and tokens both scale: the same figure)."""
    from mistral_deploy.bench import cost_per_million

    return cost_per_million(offer.hourly(spot=spot), ceilings.get(str(offer.gpu)))


def _variants(recipe: "Recipe", clouds: list[str], spot: bool) -> list[dict[str, object]]:
    """The recipe's family (VARIANTS), each on its own GPUs in the same clouds and regions: the cheapest
    offer and its $/Mtok floor."""
    from mistral_deploy import pricing
    from mistral_deploy.errors import MistralDeployError
    from mistral_deploy.fit import architecture_of, decode_ceiling, estimate
    from mistral_deploy.recipe import load_recipe

    family = next((f for f in VARIANTS if recipe.name in f), ())
    rows: list[dict[str, object]] = []
    for name in family:
        try:
            variant = recipe if name == recipe.name else load_recipe(name).recipe
        except MistralDeployError:
            continue
        arch = architecture_of(variant)
        nodes = variant.resources.num_nodes
        for gpu in variant.resources.gpu[:1]:
            fit = estimate(variant, gpu, arch) if arch else None
            found = [dataclasses.replace(o, nodes=nodes) for o in pricing.offers_for(recipe.resources, [gpu], clouds)]
            best = next(iter(pricing.cheapest_first(found, spot=spot)), None)
            rows.append({
                # the weights' format: the recipe's --quantization, else how the checkpoint stores them
                "recipe": name, "model": variant.model.id,
                "quantization": variant.model.quantization or (arch.weights if arch else None),
                "gpu": str(gpu), "nodes": nodes, "weights_gib": _round(fit.weights_gib, 2) if fit else None,
                "cheapest": f"{best.cloud} {best.region} {best.instance_type}" if best else None,
                "price_per_hour": _round(best.hourly(spot=spot), 4) if best else None,
                "usd_per_mtok_output_floor": _round(_per_mtok(best, {str(gpu): decode_ceiling(variant, gpu)}, spot))
                if best else None,
            })
    return rows


def _print_variants(out: Output, name: str, rows: list[dict[str, object]]) -> None:
    from rich import box
    from rich.table import Table

    from mistral_deploy.fit import describe_gpus

    table = Table(title="The same model, other recipes (cheapest offer each)", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for header in ("recipe", "weights", "GPU", "GiB", "cheapest", "$/h", "$/Mtok out (floor)"):
        table.add_column(header, justify="right" if header in ("GiB", "$/h", "$/Mtok out (floor)") else "left",
                         no_wrap=True)
    for row in rows:
        table.add_row(
            f"{row['recipe']}{' (this one)' if row['recipe'] == name else ''}",
            str(row["quantization"] or "16-bit"), describe_gpus(str(row["gpu"]), int(str(row["nodes"]))),
            "-" if row["weights_gib"] is None else f"{row['weights_gib']:.1f}",
            str(row["cheapest"] or "-"),
            "-" if row["price_per_hour"] is None else f"{row['price_per_hour']:.3f}",
            "-" if row["usd_per_mtok_output_floor"] is None else f"{row['usd_per_mtok_output_floor']:.3f}",
        )
    out.print(table)


def _estimate_json(gpu: GpuRequest, est: FitEstimate | None) -> dict[str, object]:
    if est is None:
        return {"gpu": str(gpu), "fits": None}
    return {
        "gpu": str(gpu),
        "fits": est.fits,
        "weights_gib": round(est.weights_gib, 2),
        "kv_cache_gib": round(est.kv_cache_gib, 2),
        "overhead_gib": round(est.overhead_gib, 2),
        "needed_gib": round(est.needed_gib, 2),
        "usable_gib": round(est.usable_gib, 2),
        "context_tokens": est.context_tokens,
        "runs": est.runs,
        "kernel_note": est.kernel_note,
    }


def _print_plan(
    out: Output,
    recipe: Recipe,
    source: str,
    estimates: dict[str, FitEstimate | None],
    offers: list[Offer],
    *,
    use_spot: bool,
    replicas: int,
    ceilings: dict[str, float | None],
) -> None:
    from rich import box
    from rich.table import Table

    from mistral_deploy.fit import describe_gpus
    from mistral_deploy.pricing import HOURS_PER_MONTH

    out.data(f"{source}: {recipe.model.id}")
    for gpu_text, est in estimates.items():
        out.data(f"  {est.summary()}" if est is not None else f"  {gpu_text}: no memory estimate")
    mode = "spot" if use_spot else "on-demand"
    per = f" x {replicas} replicas" if replicas > 1 else ""
    table = Table(title=f"Offers, cheapest first ({mode}, {HOURS_PER_MONTH} h/month{per})", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for header, justify in (("cloud", "left"), ("region", "left"), ("instance type", "left"), ("GPU", "left"),
                            ("$/h on-demand", "right"), ("$/h spot", "right"), ("est. $/month", "right"),
                            ("$/Mtok out (floor)", "right")):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for offer in offers:
        table.add_row(
            offer.cloud,
            offer.region,
            offer.instance_type,
            describe_gpus(offer.gpu, offer.nodes),
            f"{offer.hourly(spot=False):.3f}",
            "-" if offer.spot_price is None else f"{offer.hourly(spot=True):.3f}",
            f"{offer.monthly(spot=use_spot, replicas=replicas):,.0f}",
            _money(_per_mtok(offer, ceilings, use_spot)),
        )
    out.print(table)


def _money(value: "float | None") -> str:
    return "-" if value is None else f"{value:.3f}"
