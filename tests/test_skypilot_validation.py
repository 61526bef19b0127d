"""SkyPilot's own validators accept what we render, for every built-in recipe, cloud and network mode.

`sky.Task.from_yaml_config` checks the task against SkyPilot's schema (unknown fields are rejected by name)
and builds its Resources; a `service:` section is built into a SkyServiceSpec by the Task, and
`serve_utils.validate_service_task` runs the checks `sky serve up` runs before launching. All in-process:
no API server, no network (the catalog is the seeded fixture). `sky` is imported once per session.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any, Optional

import pytest

from _catalog import CATALOG_VERSION, sky_session  # noqa: F401  (fixture)
from mistral_deploy.recipe import (
    Overrides, ReplicasSpec, Recipe, builtin_recipe_names, load_recipe, validate_recipe_data,
)
from mistral_deploy.render import GATEWAY_IMAGE, admit_load_balancer, cloud_config, render_task

CLOUDS = ("aws", "gcp", "azure")
NETWORKS = ("public", "private", "vpc")
TASK_CASES = list(itertools.product(builtin_recipe_names(), CLOUDS, NETWORKS, (None, "4h")))
# SkyServe services: a fixed count, or autoscaling; on demand, or on spot with on-demand fallback
REPLICAS = {"fixed": {"min": 2}, "autoscale": {"min": 1, "max": 3, "target_qps": 4}}
SERVICE_CASES = list(itertools.product(builtin_recipe_names(), CLOUDS, sorted(REPLICAS), (False, True)))


def _recipe(name: str, cloud: str, network: str = "public", ttl: Optional[str] = None, *,
            spot: Optional[bool] = None, replicas: Optional[dict[str, Any]] = None, vpc_name: Optional[str] = None
            ) -> Recipe:
    raw = copy.deepcopy(load_recipe(name).raw)
    if network == "vpc" and (vpc_name or cloud == "aws"):
        # vpc mode on AWS needs the VPC's name
        raw.setdefault("network", {})["vpc_name"] = vpc_name or "ml-vpc"
    recipe = validate_recipe_data(raw, name, Overrides(cloud=cloud, network=network, ttl=ttl, spot=spot)).recipe
    if replicas:
        recipe = recipe.model_copy(update={"replicas": ReplicasSpec(**replicas)})
    return recipe


def _skypilot_accepts(sky: Any, config: dict[str, Any], recipe: Recipe) -> Any:
    from sky.serve import serve_utils
    from sky.utils import common_utils, schemas

    config = copy.deepcopy(config)  # from_yaml_config edits the dict it is given
    if "service" in config:  # `up` gives a service the load balancer's address, which replicas admit
        admit_load_balancer(config, ["203.0.113.9"])
    task = sky.Task.from_yaml_config(config)
    if "service" in config:
        assert task.service is not None
        serve_utils.validate_service_task(task, pool=False)
    extra = cloud_config(recipe)
    if extra:
        common_utils.validate_schema(extra, schemas.get_config_schema(), "invalid SkyPilot config: ")
    return task


def _choices(resources: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**resources, **choice} for choice in resources.get("ordered", [])] or [resources]


def _check_invariants(config: dict[str, Any], recipe: Recipe) -> None:
    resources = config["resources"]
    opened = {p for choice in _choices(resources) for p in choice.get("ports", [])}
    assert "--uds" in config["run"] and "-p 127.0.0.1" not in config["run"], "the engine has no port to open"
    if recipe.network.mode == "private":
        assert not opened, "private: no port may be opened"
    else:
        # public: the gateway's port only; vpc: the same, on a VM that has only a private address; a
        # SkyServe replica opens it for the load balancer
        assert opened == {recipe.network.port}, "the gateway's port is the only one opened"
    if recipe.replicas is not None:
        assert config["service"]["ports"] == recipe.network.port
    # secrets: names only, values supplied at launch
    assert config["secrets"] and all(value is None for value in config["secrets"].values())
    assert not set(config.get("envs", {})) & set(config["secrets"])
    if recipe.lifetime.ttl:
        assert resources["autostop"] == {"idle_minutes": -(-recipe.lifetime.ttl // 60), "down": True,
                                         "wait_for": "none"}
    else:
        assert "autostop" not in resources
    # images: pinned tags, never latest
    pulled = re.findall(r"pull (\S+)", config["setup"])
    assert pulled == [recipe.engine.image, GATEWAY_IMAGE]
    for image in pulled:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag not in ("latest", "nightly"), image


def test_catalog_fixture_matches_skypilots_schema_version(sky_session: Any) -> None:
    from sky.skylet import constants

    assert constants.CATALOG_SCHEMA_VERSION == CATALOG_VERSION


@pytest.mark.parametrize(("name", "cloud", "network", "ttl"), TASK_CASES,
                         ids=[f"{n}-{c}-{m}-{t or 'nottl'}" for n, c, m, t in TASK_CASES])
def test_task_is_accepted_by_skypilot(sky_session: Any, name: str, cloud: str, network: str,
                                      ttl: Optional[str]) -> None:
    recipe = _recipe(name, cloud, network, ttl)
    config = render_task(recipe)
    _check_invariants(config, recipe)
    task = _skypilot_accepts(sky_session, config, recipe)
    for resources in task.resources:
        assert str(resources.cloud).lower() == cloud
        assert not resources.ports if network == "private" else resources.ports == [str(recipe.network.port)]
        if ttl:
            assert resources.autostop_config.enabled and resources.autostop_config.down
            assert resources.autostop_config.wait_for.value == "none"
    assert task.service is None


@pytest.mark.parametrize(("name", "cloud", "replicas", "spot"), SERVICE_CASES,
                         ids=[f"{n}-{c}-{r}-{'spot' if s else 'ondemand'}" for n, c, r, s in SERVICE_CASES])
def test_service_is_accepted_by_skyserve(sky_session: Any, name: str, cloud: str, replicas: str, spot: bool) -> None:
    recipe = _recipe(name, cloud, "public", spot=spot, replicas=REPLICAS[replicas])
    config = render_task(recipe)
    _check_invariants(config, recipe)
    task = _skypilot_accepts(sky_session, config, recipe)
    service = task.service
    assert service.min_replicas == REPLICAS[replicas]["min"]
    assert service.max_replicas == REPLICAS[replicas].get("max")
    assert service.dynamic_ondemand_fallback is (True if spot else None)
    assert all(r.use_spot is spot for r in task.resources), "SkyServe needs all choices spot or none"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_named_vpc_is_accepted(sky_session: Any, cloud: str) -> None:
    recipe = _recipe("mistral-7b", cloud, "vpc", vpc_name="ml-vpc")
    config = render_task(recipe)
    _skypilot_accepts(sky_session, config, recipe)
    if cloud == "aws":
        assert "config" not in config
        assert cloud_config(recipe) == {"aws": {"use_internal_ips": True, "vpc_names": ["ml-vpc"]}}
    else:
        assert config["config"] == {cloud: {"vpc_name": "ml-vpc"}}
        assert cloud_config(recipe) == {cloud: {"use_internal_ips": True}}


def test_spot_with_fallback_tries_each_gpu_on_spot_then_on_demand(sky_session: Any) -> None:
    recipe = _recipe("mistral-7b", "aws", spot=True)
    config = render_task(recipe)
    assert [(c["accelerators"], c["use_spot"]) for c in config["resources"]["ordered"]] == [
        ("A10G:1", True), ("A10G:1", False), ("L4:1", True), ("L4:1", False), ("A10:1", True), ("A10:1", False)]
    task = _skypilot_accepts(sky_session, config, recipe)
    assert [(list(r.accelerators), r.use_spot) for r in task.resources] == [
        (["A10G"], True), (["A10G"], False), (["L4"], True), (["L4"], False), (["A10"], True), (["A10"], False)]


def test_skypilot_rejects_what_it_should(sky_session: Any) -> None:
    """The validator is live: a field SkyPilot does not know is refused by name."""
    config = render_task(_recipe("mistral-7b", "aws"))
    config["resources"]["tls"] = True
    with pytest.raises(Exception, match="tls"):
        sky_session.Task.from_yaml_config(config)
