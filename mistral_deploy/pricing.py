"""GPU prices per cloud and region, read from SkyPilot's own catalog (`sky.catalog`).

The one module that reads SkyPilot's catalog. It imports `sky.catalog` inside its functions (seconds of
start-up that only `plan` pays) and never starts SkyPilot's API server: the catalog is read in-process.
A catalog that is not on disk yet is fetched once, from where SkyPilot fetches it (or $MISTRAL_DEPLOY_
SKYPILOT_CATALOG_URL, a mirror), with a timeout and a progress line, and recorded as SkyPilot records its
own downloads; offline, that is an error that says how to get it, never a hang.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from mistral_deploy.errors import CloudError, RecipeError
from mistral_deploy.recipe import GpuRequest

PRICED_CLOUDS = ("aws", "gcp", "azure")
HOURS_PER_MONTH = 730
# Where SkyPilot's catalogs are fetched from, if not SkyPilot's own (GitHub, then its S3 mirror): a mirror.
CATALOG_URL_ENV = "MISTRAL_DEPLOY_SKYPILOT_CATALOG_URL"
FETCH_TIMEOUT = 60.0


@dataclass(frozen=True)
class Offer:
    """One way to rent a GPU configuration: an instance type in a region, with its hourly prices."""

    cloud: str
    region: str
    instance_type: str
    gpu: GpuRequest
    price: float  # on-demand, $/hour, of one instance
    spot_price: Optional[float]  # $/hour; None where the catalog lists no spot market
    nodes: int = 1  # instances one deployment takes (a model across several nodes)

    def hourly(self, *, spot: bool) -> float:
        """The price one would pay, all nodes together: spot where asked for and offered, on-demand otherwise."""
        if spot and self.spot_price is not None:
            return self.spot_price * self.nodes
        return self.price * self.nodes

    def monthly(self, *, spot: bool, replicas: int = 1) -> float:
        return self.hourly(spot=spot) * HOURS_PER_MONTH * replicas

    def to_json(self, *, spot: bool, replicas: int = 1) -> dict[str, Any]:
        return {
            "cloud": self.cloud,
            "region": self.region,
            "instance_type": self.instance_type,
            "gpu": str(self.gpu),
            "nodes": self.nodes,
            # all nodes together
            "price_per_hour": round(self.price * self.nodes, 6),
            "spot_price_per_hour": None if self.spot_price is None else round(self.spot_price * self.nodes, 6),
            "monthly": round(self.monthly(spot=spot, replicas=replicas), 2),
        }


def cheapest_first(offers: Iterable[Offer], *, spot: bool) -> list[Offer]:
    """Cheapest first by the hourly price that would be paid; ties broken so the order is stable."""
    return sorted(offers, key=lambda o: (o.hourly(spot=spot), o.price, o.cloud, o.region, o.instance_type))


def cheapest_per_region(offers: Iterable[Offer], *, spot: bool) -> list[Offer]:
    """The cheapest instance type for each (cloud, region, GPU), cheapest first."""
    best: dict[tuple[str, str, str], Offer] = {}
    for offer in cheapest_first(offers, spot=spot):
        best.setdefault((offer.cloud, offer.region, str(offer.gpu)), offer)
    return list(best.values())


def catalog_files(clouds: Iterable[str]) -> dict[str, Path]:
    """Where SkyPilot keeps each cloud's VM catalog (it follows $SKY_RUNTIME_DIR)."""
    from sky.catalog import common

    return {cloud: Path(common.get_catalog_path(f"{cloud}/vms.csv")) for cloud in clouds}


def ensure_catalogs(clouds: Iterable[str], say: Callable[[str], None] = lambda _line: None, *,
                    command: str = "plan") -> None:
    """Fetch the VM catalogs of these clouds that are not on disk yet (once; SkyPilot refreshes them later).
    `command`: the mistral-deploy command the hint of a failed fetch says to run again."""
    for cloud, path in catalog_files(clouds).items():
        if not path.is_file():
            fetch_catalog(f"{cloud}/vms.csv", path, say, command=command)


def fetch_catalog(filename: str, path: Path, say: Callable[[str], None], *, timeout: float = FETCH_TIMEOUT,
                  command: str = "plan") -> None:
    """One catalog file, as SkyPilot's own fetch writes it: the file, and the md5 beside it in `.meta/` that
    marks it as downloaded (not edited), so that SkyPilot keeps refreshing it."""
    import hashlib
    import os
    from urllib.parse import urlsplit

    import httpx
    from sky.skylet import constants

    mirror = os.environ.get(CATALOG_URL_ENV)
    bases = [mirror.rstrip("/")] if mirror else [constants.HOSTED_CATALOG_DIR_URL,
                                                 constants.HOSTED_CATALOG_DIR_URL_S3_MIRROR]
    cloud = filename.split("/", 1)[0]
    problem = "no source"
    for base in bases:
        url = f"{base}/{constants.CATALOG_SCHEMA_VERSION}/{filename}"
        say(f"fetching SkyPilot's {cloud} catalog ({filename}, once) from {urlsplit(url).netloc}")
        try:
            response = httpx.get(url, timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
                                 follow_redirects=True, headers={"User-Agent": "SkyPilot/0.7"})
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {_first_line(exc) or 'no answer'}"
            continue
        if response.status_code != 200:  # 429: GitHub's rate limit; the mirror is next
            problem = f"HTTP {response.status_code} from {urlsplit(url).netloc}"
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".csv.tmp")
        tmp.write_text(response.text, encoding="utf-8")
        tmp.replace(path)
        meta = path.parent.parent / ".meta" / f"{filename}.md5"
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(hashlib.md5(response.text.encode(), usedforsecurity=False).hexdigest(), encoding="utf-8")
        return
    raise CloudError(
        f"SkyPilot's {cloud} catalog is not downloaded yet ({path}), and fetching it failed ({problem})",
        hint=f"fetch it once while online, e.g. `sky show-gpus --infra {cloud}`, or set {CATALOG_URL_ENV} to a "
             f"mirror of SkyPilot's catalogs, then run {command} again",
    )


def find_offers(gpus: list[GpuRequest], clouds: list[str], region: Optional[str] = None, *,
                command: str = "plan") -> list[Offer]:
    """Every (cloud, region, instance type) that offers each GPU configuration, with its catalog prices.
    `command`: the mistral-deploy command the hint for a missing catalog says to run again."""
    unknown = [c for c in clouds if c not in PRICED_CLOUDS]
    if unknown:
        raise RecipeError(
            f"--cloud: plan prices {', '.join(PRICED_CLOUDS)}; {unknown[0]!r} has no price catalog"
        )
    missing = {cloud: path for cloud, path in catalog_files(clouds).items() if not path.is_file()}
    if missing:
        cloud, path = next(iter(missing.items()))
        raise CloudError(
            f"SkyPilot's {cloud} catalog is not downloaded yet ({path})",
            hint=f"fetch it once while online, e.g. `sky show-gpus --infra {cloud}`, then run {command} again",
        )
    offers: list[Offer] = []
    for gpu in gpus:
        for info in _list_accelerators(gpu, clouds, region):
            offers.append(
                Offer(
                    cloud=str(info.cloud).lower(),  # SkyPilot says AWS, GCP, Azure
                    region=str(info.region),
                    instance_type=str(info.instance_type),
                    gpu=GpuRequest(name=str(info.accelerator_name), count=gpu.count),
                    price=float(info.price),
                    spot_price=_price_or_none(info.spot_price),
                )
            )
    return offers


def _list_accelerators(gpu: GpuRequest, clouds: list[str], region: Optional[str]) -> list[Any]:
    import sky.catalog

    # SkyPilot prints progress for catalog refreshes on stdout; keep stdout for our own output.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            found = sky.catalog.list_accelerators(
                gpus_only=True,
                name_filter=f"^{re.escape(gpu.name)}$",
                region_filter=f"^{re.escape(region)}$" if region else None,
                quantity_filter=gpu.count,
                clouds=list(clouds),
                case_sensitive=False,
                all_regions=True,
            )
        except Exception as exc:  # the catalog is a file SkyPilot may refresh or users may edit
            raise CloudError(f"reading SkyPilot's catalog failed: {type(exc).__name__}: {_first_line(exc)}") from None
    return [info for infos in found.values() for info in infos if _price_or_none(info.price) is not None]


def _price_or_none(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def offers_for(resources: Any, gpus: list[GpuRequest], clouds: list[str]) -> list[Offer]:
    """Every offer for these GPUs on these clouds, each in the recipe's region for it (resources:
    the recipe's ResourcesSpec)."""
    return [o for c in clouds for o in find_offers(gpus, [c], resources.region_for(c))]


def serve_consolidation_mode() -> bool:
    """SkyServe's consolidation mode (SkyPilot config `serve.controller.consolidation_mode: true`): the
    controller runs inside SkyPilot's API server, with no VM of its own. Read by SkyPilot's own config reader,
    as this machine's SkyPilot config says it (a remote API server's own config cannot be seen from here).
    It imports `sky`: only the commands that price a service call it (`plan`, `up`, `status`)."""
    try:
        from sky import skypilot_config

        skypilot_config.reload_config()  # what the config files say now, not when `sky` was first imported
        return skypilot_config.get_nested(("serve", "controller", "consolidation_mode"), False) is True
    except Exception:  # noqa: BLE001 - a price is informative only: then the controller VM is counted
        return False


def controller_price(cloud: str, region: Optional[str] = None) -> Optional[float]:
    """$/hour of the VM SkyServe's controller runs on (its CONTROLLER_RESOURCES: CPUs and memory): the
    cloud's default instance type for them in SkyPilot's catalog; None where the catalog cannot tell."""
    try:
        from sky import catalog
        from sky.serve.constants import CONTROLLER_RESOURCES

        with contextlib.redirect_stdout(io.StringIO()):
            instance = catalog.get_default_instance_type(cpus=CONTROLLER_RESOURCES.get("cpus"),
                                                         memory=CONTROLLER_RESOURCES.get("memory"),
                                                         region=region, clouds=cloud)
            if instance is None:
                return None
            return float(catalog.get_hourly_cost(instance, use_spot=False, region=region, zone=None, clouds=cloud))
    except Exception:  # noqa: BLE001 - a price is informative only
        return None
