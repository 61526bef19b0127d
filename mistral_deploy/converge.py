"""`up` on a deployment that exists: what differs between the recorded recipe and the asked one, and the
cheapest way to get there that keeps the endpoint up.

Pure: compares two validated recipes field by field (defaults included, so a default spelled out is no
change) and names, for each changed field, what applying it costs. The backends apply a plan.

Effects, cheapest first:
  record          nothing runs differently (health timeouts, a description): the record is updated
  ttl             the cluster's autodown is set again (SkyPilot autostop), nothing restarts
  gateway-reload  nginx re-reads its configuration: new connections get it, requests in flight finish
  gateway-restart the gateway is started again on another port or address (locally): the address changes
  engine-restart  the engine starts again on the same machine: same address, keys and certificate
  new-cluster     a new cluster is launched, the endpoint switched to it, the old one removed
  service-update  `sky serve update`: replicas replaced one by one (rolling), or all at once (blue-green)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from mistral_deploy.errors import RecipeError

if TYPE_CHECKING:
    from mistral_deploy.recipe import Recipe

EFFECTS = ("record", "ttl", "gateway-reload", "gateway-restart", "engine-restart", "new-cluster",
           "service-update")
WHAT_IT_COSTS = {
    "record": "nothing restarts",
    "ttl": "the end time is set again; nothing restarts",
    "gateway-reload": "gateway reload: requests in flight finish, none is dropped",
    "gateway-restart": "gateway restart on the new address: connections are cut",
    "engine-restart": "engine restart on the same machine: same address, keys and certificate; "
                      "requests fail until the model is loaded again",
    "new-cluster": "new cluster: launched, then the endpoint switches to it (a new address) and the old "
                   "one is removed",
    "service-update": "sky serve update: replicas are replaced one at a time (rolling), or switched all at once "
                      "once the new ones are ready (replicas.update: blue-green)",
}

# The first matching prefix decides. On a cloud, everything the VM is or where it runs needs a new cluster;
# locally, the listener is the gateway's alone.
_LOCAL_RULES: tuple[tuple[str, str], ...] = (
    ("description", "record"), ("health.", "record"), ("auth.keys", "record"), ("lifetime.", "record"),
    ("network.allow", "gateway-reload"), ("network.max_body_size", "gateway-reload"),
    ("auth.enabled", "gateway-reload"), ("guardrail", "gateway-reload"),
    ("limits.max_tokens", "engine-restart"),  # vLLM's own cap (--override-generation-config) too
    ("limits.", "gateway-reload"),
    ("network.", "gateway-restart"),
    ("model.", "engine-restart"), ("engine.", "engine-restart"), ("resources.tensor_parallel", "engine-restart"),
    ("resources.", "record"),  # GPU, region, spot: nothing to do with this machine
)
_CLOUD_RULES: tuple[tuple[str, str], ...] = (
    ("description", "record"), ("health.", "record"), ("auth.keys", "record"), ("replicas.update", "record"),
    ("lifetime.ttl", "ttl"),
    ("network.allow", "gateway-reload"), ("network.max_body_size", "gateway-reload"),
    ("auth.enabled", "gateway-reload"), ("guardrail", "gateway-reload"),
    ("limits.max_tokens", "engine-restart"),
    ("limits.", "gateway-reload"),
    ("model.", "engine-restart"), ("engine.", "engine-restart"), ("resources.tensor_parallel", "engine-restart"),
    ("network.", "new-cluster"),  # mode, port, TLS: which ports are opened, which certificate is made
    ("resources.", "new-cluster"),
)


@dataclass(frozen=True)
class Change:
    field: str  # dotted path in the recipe, e.g. limits.requests_per_minute
    before: Any
    after: Any
    effect: str

    def to_json(self) -> dict[str, Any]:
        return {"field": self.field, "from": self.before, "to": self.after, "effect": self.effect}


@dataclass(frozen=True)
class ServeController:
    """SkyServe's controller, as it weighs on a service's price. One controller VM serves every service of a
    user, so a service's price counts its replicas only and the controller is shown apart, once, with the
    number of services recorded here that share it; in consolidation mode it runs inside SkyPilot's API
    server and there is no VM to pay for."""

    price: Optional[float]  # $/hour of its VM; None: no VM (consolidated), or no price known
    consolidated: bool
    services: int  # services recorded here that share it (other services of the same user share it too)

    def line(self) -> str:
        if self.consolidated:
            return ("SkyServe controller: no VM of its own (serve.controller.consolidation_mode: it runs in "
                    "SkyPilot's API server), nothing to add")
        price = f"{_price(self.price)} for its VM" if self.price is not None else "its VM's price unknown"
        shared = f"{self.services} service{'s' if self.services != 1 else ''} recorded here"
        return (f"SkyServe controller: {price}, once for all your services ({shared}); "
                f"not in a service's price")

    def to_json(self) -> dict[str, Any]:
        return {"price_per_hour": self.price, "consolidation_mode": self.consolidated,
                "services_recorded": self.services, "in_service_price": False}


@dataclass
class Plan:
    name: str
    backend: str
    changes: list[Change] = field(default_factory=list)
    price_before: Optional[float] = None  # $/hour; a service: its replicas only
    price_after: Optional[float] = None
    controller: Optional[ServeController] = None  # a service: SkyServe's controller, apart

    @property
    def effect(self) -> Optional[str]:
        """The costliest effect of the changes (None: nothing changes)."""
        if not self.changes:
            return None
        return max((c.effect for c in self.changes), key=EFFECTS.index)

    def needs(self, effect: str) -> bool:
        return any(c.effect == effect for c in self.changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "changed": bool(self.changes),
            "effect": self.effect,
            "changes": [c.to_json() for c in self.changes],
            "price_per_hour": {"before": self.price_before, "after": self.price_after},
            "serve_controller": self.controller.to_json() if self.controller else None,
        }

    def lines(self) -> list[str]:
        """The diff as a person reads it: one line per field, then what applying it costs."""
        if not self.changes:
            return [f"{self.name}: no change"]
        width = max(len(c.field) for c in self.changes)
        values = [f"{_show(c.before)} -> {_show(c.after)}" for c in self.changes]
        value_width = max(len(v) for v in values)
        out = [f"{self.name}: {len(self.changes)} change{'s' if len(self.changes) > 1 else ''}"]
        for c, value in zip(self.changes, values):
            out.append(f"  {c.field.ljust(width)}  {value.ljust(value_width)}  [{c.effect}]")
        out.append(f"apply: {WHAT_IT_COSTS[self.effect or 'record']}")
        if self.price_before is not None or self.price_after is not None:
            out.append(f"price: {_price(self.price_before)} -> {_price(self.price_after)}")
        if self.controller is not None:
            out.append(f"+ {self.controller.line()}")
        return out


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _price(value: Optional[float]) -> str:
    return "unknown" if value is None else f"${value:.2f}/hour"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and the free-form map engine.env stay whole."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = prefix + key
        if isinstance(value, dict) and value and path != "engine.env":
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def effect_of(path: str, *, local: bool) -> str:
    for prefix, effect in (_LOCAL_RULES if local else _CLOUD_RULES):
        if path == prefix or path.startswith(prefix):
            return effect
    return "engine-restart" if local else "new-cluster"  # unknown: the safe side


def _tokenized_by_mistral(*recipes: "Recipe") -> bool:
    from mistral_deploy.render import uses_mistral_tokenizer

    return all(uses_mistral_tokenizer(list(r.model.vllm_args)) for r in recipes)


def diff(recorded: "Recipe", asked: "Recipe", backend: str) -> Plan:
    """The plan that takes a deployment recorded with `recorded` to `asked`; RecipeError for the changes
    no plan can make in place (where it runs: local <-> cloud, one VM <-> a service)."""
    if recorded.is_local != asked.is_local:
        where = "this machine" if recorded.is_local else "a cloud"
        raise RecipeError(
            f"resources.cloud: {recorded.name} runs on {where}; moving it between this machine and a cloud is a "
            f"new deployment", hint=f"`mistral-deploy down {recorded.name}` first, or pick another --name")
    if (recorded.replicas is None) != (asked.replicas is None):
        raise RecipeError(
            f"replicas: {recorded.name} is {'one VM' if recorded.replicas is None else 'a SkyServe service'}; "
            f"turning one into the other is a new deployment",
            hint=f"`mistral-deploy down {recorded.name}` first, or pick another --name")
    before = flatten(recorded.model_dump(mode="json"))
    after = flatten(asked.model_dump(mode="json"))
    local = recorded.is_local
    changes = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        effect = effect_of(path, local=local)
        if path == "guardrail" and effect == "gateway-reload" and not _tokenized_by_mistral(recorded, asked):
            effect = "engine-restart"  # the engine's chat template keeps the guardrail first (render.engine_args)
        if backend == "serve" and effect in ("gateway-reload", "engine-restart", "new-cluster", "ttl"):
            effect = "service-update"  # replicas get everything through SkyServe
        changes.append(Change(path, old, new, effect))
    return Plan(name=recorded.name, backend=backend, changes=changes)


def _cheapest_offer(recipe: "Recipe") -> Any:
    """The cheapest offer for the recipe's first GPU on its priced clouds (SkyPilot's catalog), or None."""
    if recipe.is_local or not recipe.resources.gpu:
        return None
    try:
        from mistral_deploy import pricing

        clouds = [c for c in recipe.resources.clouds if c in pricing.PRICED_CLOUDS]
        if not clouds:
            return None
        offers = pricing.offers_for(recipe.resources, recipe.resources.gpu[:1], clouds)
        best = pricing.cheapest_first(offers, spot=recipe.resources.spot)
    except Exception:  # noqa: BLE001 - a price is informative only
        return None
    return best[0] if best else None


def estimate_price(recipe: "Recipe") -> Optional[float]:
    """$/hour of the cheapest offer for the recipe's first GPU on its clouds (SkyPilot's catalog), every node
    of it, or None when that cannot be told here (no catalog, a cloud without prices). A service: every
    replica (its minimum, at least one); SkyServe's controller VM is shared by all of a user's services, so
    it is not in here but apart (serve_controller)."""
    best = _cheapest_offer(recipe)
    if best is None:
        return None
    replicas = 1 if recipe.replicas is None else max(1, recipe.replicas.min)  # a request wakes one from zero
    nodes = recipe.resources.num_nodes  # a model across several nodes: every one of them
    return round(best.hourly(spot=recipe.resources.spot) * replicas * nodes, 4)


def serve_controller(recipe: "Recipe", services: int) -> ServeController:
    """SkyServe's controller for a service of this recipe: no VM in consolidation mode; else the VM SkyPilot
    would start for it, priced where the service's cheapest replica runs (SkyPilot puts the controller on
    one of the task's clouds). `services`: how many services recorded here share it."""
    from mistral_deploy import pricing

    if pricing.serve_consolidation_mode():
        return ServeController(price=None, consolidated=True, services=services)
    best = _cheapest_offer(recipe)
    price = pricing.controller_price(best.cloud, best.region) if best is not None else None
    return ServeController(price=None if price is None else round(price, 4), consolidated=False, services=services)
