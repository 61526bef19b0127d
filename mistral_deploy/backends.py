"""Where a deployment runs: the local machine, a SkyPilot cluster, or a SkyServe service.

The CLI talks to backends only through this interface, and picks one by the recipe (`up`) or by the
deployment record (`status`, `logs`, `env`, `down`). Backends import their heavy dependencies lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol

if TYPE_CHECKING:
    from mistral_deploy.converge import Plan
    from mistral_deploy.progress import Progress
    from mistral_deploy.recipe import Recipe
    from mistral_deploy.state import Deployment, StateStore


class Backend(Protocol):
    kind: str  # the `backend` field of the deployment record

    def up(self, recipe: "Recipe", store: "StateStore", progress: "Progress") -> "Deployment":
        """Create, start and wait until ready. On failure or Ctrl-C: leave nothing unrecorded."""

    def down(self, deployment: "Deployment", store: "StateStore", progress: "Progress") -> None:
        """Stop everything and remove the record."""

    def status(self, deployment: "Deployment") -> dict[str, Any]:
        """Re-probe: at least {"name", "backend", "phase", "healthy": bool, "endpoint", "ip"}."""

    def logs(self, deployment: "Deployment", *, follow: bool, lines: int) -> Iterator[str]:
        """The engine's (and gateway's) log lines; never a secret."""

    def apply(self, deployment: "Deployment", recipe: "Recipe", plan: "Plan", store: "StateStore",
              progress: "Progress") -> "Deployment":
        """Take a recorded deployment to `recipe` the cheapest way the plan allows (converge.py), and start
        again whatever of it stopped; return once it answers."""

    def apply_keys(self, deployment: "Deployment", keys: dict[str, str], store: "StateStore",
                   progress: "Progress") -> None:
        """The gateway accepts exactly `keys` ({id: key}) from now on; requests in flight finish."""


def backend_named(kind: str) -> Backend:
    if kind == "local":
        from mistral_deploy.local import LocalBackend

        return LocalBackend()
    if kind in ("cloud", "serve"):
        from mistral_deploy.cloud import backend_for_kind

        return backend_for_kind(kind)
    raise ValueError(f"unknown backend {kind!r}")


def backend_for_recipe(recipe: "Recipe") -> Backend:
    if recipe.is_local:
        return backend_named("local")
    return backend_named("serve" if recipe.replicas is not None else "cloud")


def endpoint_host(endpoint: Optional[str]) -> Optional[str]:
    if not endpoint:
        return None
    from urllib.parse import urlsplit

    return urlsplit(endpoint).hostname
