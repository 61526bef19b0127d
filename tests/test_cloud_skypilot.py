"""The real SkyPilot, in-process (no API server): what `up` would launch, with its secrets filled.

These run SkyPilot's own Task/SkyServiceSpec construction, config validation, catalog and exception
classes; only the calls that need an API server and a cloud account are left to tests/test_cloud.py's fake.
"""

from __future__ import annotations

import io
import os
import logging
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from mistral_deploy.errors import CloudError
from mistral_deploy.recipe import Overrides, load_recipe, validate_recipe_data
from mistral_deploy.render import (HF_TOKEN_SECRET, KEY_HASHES_SECRET, PROBE_KEY_SECRET, admit_load_balancer,
                                   cloud_config, render_task)
from mistral_deploy.skysdk import ClusterInfo, SkySdk, describe_sky_error

KEY = "md-THIS-IS-THE-SECRET-API-KEY-0123456789abcdef"
KEY2 = "md-second-secret-api-key-0123456789abcdefghij"
HF = "hf_THISISTHESECRETHFTOKEN0123456789"
PROBE = "md-probe-secret-key-0123456789abcdefghijklmn"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module", autouse=True)
def no_skypilot_api_server_left():
    """Nothing here may start SkyPilot's API server (every SDK request would); none is left running."""
    from cloud_support import skypilot_api_servers

    before = skypilot_api_servers()
    yield
    assert skypilot_api_servers() - before == set()



def _recipe(ref: str = "mistral-7b-instruct", **flags):
    return load_recipe(ref, Overrides(**flags)).recipe


@pytest.fixture(scope="module")
def sky_mod():
    return pytest.importorskip("sky")


def _capture_everything(fn):
    """Run fn with stdout, stderr and every logger (DEBUG) captured; (result, all text)."""
    out, err, log = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    sky_logger = logging.getLogger("sky")
    sky_logger.addHandler(handler)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            result = fn()
    finally:
        root.removeHandler(handler)
        sky_logger.removeHandler(handler)
        root.setLevel(old_level)
    return result, out.getvalue() + err.getvalue() + log.getvalue()


def test_launched_task_carries_secrets_as_inline_secrets_never_in_what_is_shown(sky_mod):
    recipe = _recipe(cloud="aws", gpu="A10G", ttl="4h")
    config = render_task(recipe)
    secrets = {KEY_HASHES_SECRET: f"{KEY} {KEY2}", HF_TOKEN_SECRET: HF}

    task, shown = _capture_everything(lambda: SkySdk().make_task(config, secrets))

    # SkyPilot exports them to setup/run as environment variables, from the task's secrets
    plain = {k: v.get_secret_value() for k, v in task.secrets.items()}
    assert plain == secrets
    assert task.managed_secret_refs == []  # filled inline, not left for a secrets provider
    assert KEY_HASHES_SECRET not in task.envs and "HF_TOKEN" not in task.envs
    # what SkyPilot records and shows (`sky status` / the dashboard's task YAML) keeps them null
    recorded = task.to_yaml_config(use_user_specified_yaml=True)
    assert recorded["secrets"] == {KEY_HASHES_SECRET: None}  # a single VM gets HF_TOKEN over SSH, not here
    for text in (shown, repr(task), str(task), str(recorded), str(config), repr(task.resources)):
        for secret in (KEY, KEY2, HF):
            assert secret not in text
    # nor anywhere in the script a process would be started with
    assert KEY not in (task.run or "") and KEY not in (task.setup or "")


def test_ttl_becomes_autodown_that_waits_for_nothing(sky_mod):
    for flags in ({"gpu": "A10G"}, {"gpu": "A10G", "spot": True}):
        task = SkySdk().make_task(render_task(_recipe(cloud="aws", ttl="4h", **flags)),
                                  {KEY_HASHES_SECRET: KEY, HF_TOKEN_SECRET: HF})
        configs = [r.autostop_config for r in task.resources]
        assert configs and all(c is not None for c in configs)
        for c in configs:
            assert (c.enabled, c.idle_minutes, c.down, c.wait_for.value) == (True, 240, True, "none")


def test_spot_with_fallback_orders_spot_before_on_demand(sky_mod):
    task = SkySdk().make_task(render_task(_recipe(cloud="gcp", gpu="A100:2", spot=True, model=None,
                                                  name="mix", ttl=None)),
                              {KEY_HASHES_SECRET: KEY, HF_TOKEN_SECRET: HF})
    spots = [r.use_spot for r in task.resources]
    assert spots == [True, False]
    assert {str(r.cloud).lower() for r in task.resources} == {"gcp"}


def test_public_and_vpc_tasks_open_only_the_gateway_port_private_none(sky_mod):
    # vpc: opened on a VM that has only a private address (SkyPilot's internal-IP config), so reachable
    # inside the VPC alone; private: nothing, the gateway is reached over SSH
    for mode, expected in (("public", {"8443"}), ("private", set()), ("vpc", {"8443"})):
        task = SkySdk().make_task(render_task(_recipe(cloud="gcp", gpu="L4", network=mode)),
                                  {KEY_HASHES_SECRET: KEY, HF_TOKEN_SECRET: HF})
        ports = set()
        for r in task.resources:
            ports |= {str(p) for p in (r.ports or [])}
        assert ports == expected, mode


def test_service_probe_sends_the_probe_key_and_the_spec_never_shows_it(sky_mod):
    raw = {"name": "svc", "model": {"id": "mistralai/Mistral-7B-Instruct-v0.3"},
           "resources": {"cloud": "aws", "gpu": "A10G"}, "replicas": {"min": 1, "max": 3, "target_qps": 2}}
    recipe = validate_recipe_data(raw, "test").recipe
    config = admit_load_balancer(render_task(recipe), ["203.0.113.9"])
    secrets = {KEY_HASHES_SECRET: f"{KEY} {PROBE}", PROBE_KEY_SECRET: PROBE}
    task, shown = _capture_everything(lambda: SkySdk().make_task(config, secrets))
    service = task.service
    assert service.readiness_headers == {"Authorization": f"Bearer {PROBE}"}
    assert service.readiness_path == "/v1/completions"
    assert (service.min_replicas, service.max_replicas, service.target_qps_per_replica) == (1, 3, 2)
    for text in (shown, repr(service), repr(task), str(task.to_yaml_config(use_user_specified_yaml=True))):
        assert PROBE not in text and KEY not in text


def test_missing_secret_value_is_refused_before_skypilot(sky_mod):
    with pytest.raises(CloudError, match=KEY_HASHES_SECRET):
        SkySdk().make_task(render_task(_recipe(cloud="aws", gpu="A10G")), {HF_TOKEN_SECRET: HF})


def test_vpc_global_config_travels_with_the_request(sky_mod, monkeypatch):
    from sky.server.requests import payloads
    from sky.utils import annotations

    # what every client SDK call (@annotations.client_api) sets before it builds its request body
    monkeypatch.setattr(annotations, "is_on_api_server", False)

    recipe = _recipe(cloud="gcp", gpu="L4", network="vpc")
    cfg = cloud_config(recipe)
    assert cfg["gcp"]["use_internal_ips"] is True
    sdk = SkySdk()
    with sdk._global_config(cfg):
        sent = payloads.get_override_skypilot_config_from_client()
    assert sent.get("gcp", {}).get("use_internal_ips") is True
    outside = payloads.get_override_skypilot_config_from_client()
    assert (outside.get("gcp") or {}).get("use_internal_ips") is None


@pytest.fixture
def seeded_catalog(sky_mod) -> Path:
    """SkyPilot's catalog from tests/fixtures, where this process's SkyPilot reads it.

    SkyPilot fixes its catalog folder when `sky` is first imported (under that moment's SKY_RUNTIME_DIR),
    so the files go there, not under this test's. Files without a .meta md5 are never re-fetched.
    """
    from sky.catalog import common

    target = Path(common.get_catalog_path("x")).parent
    shutil.copytree(FIXTURES / "catalog" / "v8", target, dirs_exist_ok=True)
    return target


def _catalog_price(cloud: str, instance: str, region: str, spot: bool) -> float:
    import csv

    rows = list(csv.DictReader((FIXTURES / "catalog" / "v8" / cloud / "vms.csv").open()))
    prices = [float(r["SpotPrice" if spot else "Price"]) for r in rows
              if r["InstanceType"] == instance and r["Region"] == region and r["SpotPrice" if spot else "Price"]]
    return min(prices)


def test_hourly_price_comes_from_skypilots_catalog(sky_mod, seeded_catalog):
    import csv

    rows = [r for r in csv.DictReader((FIXTURES / "catalog" / "v8" / "aws" / "vms.csv").open())
            if r["AcceleratorName"] == "A10G"]
    if not rows:
        pytest.skip("the catalog fixture has no A10G row")
    row = rows[0]
    sdk = SkySdk()
    for spot in (False, True):
        cluster = ClusterInfo(name="c", status="UP", cloud="aws", region=row["Region"], instance_type=row["InstanceType"],
                              use_spot=spot)
        assert sdk.hourly_price(cluster) == pytest.approx(_catalog_price("aws", row["InstanceType"], row["Region"], spot))
    assert sdk.hourly_price(ClusterInfo(name="c", status="UP")) is None
    assert sdk.hourly_price(ClusterInfo(name="c", status="UP", cloud="aws", instance_type="no.such")) is None


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda sx: sx.ResourcesUnavailableError(
            "Failed to acquire resources in all zones in us-east-1",
            failover_history=[Exception("An error occurred (VcpuLimitExceeded): You have requested more vCPU "
                                        "capacity than your current vCPU limit")]), "quota increase"),
        (lambda sx: sx.ResourcesUnavailableError(
            "Failed to acquire resources",
            failover_history=[Exception("InsufficientInstanceCapacity: We currently do not have sufficient "
                                        "g5.xlarge capacity")]), "another region (--region)"),
        (lambda sx: sx.ResourcesUnavailableError("No launchable resource found for A10G:1"), "another region"),
        (lambda sx: sx.NoCloudAccessError("Cloud access is not set up"), "sky check"),
        (lambda sx: sx.CloudUserIdentityError("AWS credentials expired"), "sky check"),
        (lambda sx: sx.NotSupportedError("Opening ports is not supported on Lambda"), "another --cloud"),
        (lambda sx: RuntimeError("boom\nsecond line"), "SkyPilot failed: boom"),
    ],
)
def test_skypilot_errors_become_one_line_that_says_what_to_do(sky_mod, make, expected):
    from sky import exceptions as sx

    error = describe_sky_error(make(sx), "launch")
    assert isinstance(error, CloudError) and error.exit_code == 9
    assert "\n" not in error.message
    assert expected in error.message


def test_the_sdk_calls_skysdk_makes_match_skypilot_0_14_signatures(sky_mod):
    """SkySdk's calls, bound against the installed SkyPilot's own signatures (no call is made)."""
    import inspect

    import sky
    from sky import catalog
    from sky.client.cli import command as sky_cli

    def binds(fn, *args, **kwargs):
        inspect.signature(fn).bind(*args, **kwargs)

    task = object()
    binds(sky.launch, task, cluster_name="md-x")
    binds(sky.stream_and_get, "rid", output_stream=io.StringIO())
    binds(sky.get, "rid")
    binds(sky.api_cancel, "rid", silent=True)
    binds(sky.status, cluster_names=["md-x"], refresh=sky.StatusRefreshMode.AUTO)
    binds(sky.job_status, "md-x", [1])
    binds(sky.endpoints, "md-x", 8443)
    binds(sky.down, "md-x")
    binds(sky.tail_logs, "md-x", 1, follow=True, tail=0, preload_content=False)
    binds(sky.serve.up, task, "md-x")
    binds(sky.serve.status, ["md-x"])
    binds(sky.serve.status, None)
    binds(sky.serve.down, "md-x")
    binds(sky.serve.tail_logs, "md-x", target="replica", replica_id=1, follow=False,
          output_stream=io.StringIO(), tail=None)
    binds(catalog.get_hourly_cost, "g5.xlarge", use_spot=False, region=None, zone=None, clouds="aws")
    binds(catalog.list_accelerators, gpus_only=True, clouds="aws", all_regions=False)
    binds(sky.Resources, infra="slurm")
    binds(sky_cli._get_cluster_records_and_set_ssh_config, clusters=["md-x"])
    from sky.utils import cluster_utils

    assert "{}" in cluster_utils.SSHConfigHelper.ssh_cluster_path


# --- what a cloud can do, asked of SkyPilot before anything is launched (mistral_deploy.infra) ---------


def test_our_list_of_infrastructures_is_skypilots(sky_mod):
    """`render` and recipe validation know SkyPilot's infrastructure names without importing it."""
    from sky.utils import registry

    from mistral_deploy.infra import CLOUD_ALIASES, SKYPILOT_CLOUDS

    assert set(SKYPILOT_CLOUDS) == set(registry.CLOUD_REGISTRY)
    assert CLOUD_ALIASES == registry.CLOUD_REGISTRY._aliases  # noqa: SLF001


# (recipe, cloud) pairs the small fixture catalog (tests/fixtures/catalog) cannot offer because SkyPilot's
# own catalog has no such row: Azure lists no H200 or B200 machine, and its 8-GPU H100 (ND96isr_H100_v5) as
# 12 GPUs. Mistral Large 3 in FP8 needs 8 H200 or 8 B200 on one node.
NOT_IN_SKYPILOTS_CATALOG = {("mistral-large-3", "azure")}


def test_builtin_recipes_offer_a_gpu_on_every_major_cloud(sky_mod, seeded_catalog):
    """Each built-in recipe has a GPU candidate that AWS, GCP and Azure each offer (SkyPilot's catalog)."""
    from mistral_deploy.fit import check_fit
    from mistral_deploy.infra import check_gpus_offered
    from mistral_deploy.recipe import builtin_recipe_names

    for name in builtin_recipe_names():
        if name == "tiny-mistral":
            continue  # a CPU-sized model for trying things: any GPU
        for cloud in ("aws", "gcp", "azure"):
            if (name, cloud) in NOT_IN_SKYPILOTS_CATALOG:
                continue
            recipe = _recipe(name, cloud=cloud)
            check_fit(recipe)
            check_gpus_offered(recipe, SkySdk())  # raises naming what the cloud offers instead


def test_a_gpu_the_cloud_does_not_offer_is_refused_saying_what_it_offers(sky_mod, seeded_catalog):
    from mistral_deploy.infra import check_gpus_offered

    with pytest.raises(CloudError) as caught:
        check_gpus_offered(_recipe("mistral-7b", cloud="gcp", gpu="A10G"), SkySdk())
    message = caught.value.message
    assert message.startswith("resources.gpu: gcp offers none of A10G:1; gcp offers ") and "L4:1" in message
    # several clouds: one that offers it is enough (SkyPilot skips the others)
    check_gpus_offered(_recipe("mistral-7b", cloud="gcp,aws", gpu="A10G"), SkySdk())


def test_what_an_infrastructure_cannot_do_is_refused_before_launching(sky_mod):
    from mistral_deploy.errors import RecipeError
    from mistral_deploy.infra import check_launchable

    sdk = SkySdk()
    with pytest.raises(RecipeError) as caught:
        check_launchable(_recipe("tiny-mistral", cloud="slurm", gpu="A10G", network="public"), sdk)
    assert caught.value.message == (
        "network.mode: public needs the gateway port opened, which SkyPilot cannot do on slurm (Opening ports "
        "is not supported in Slurm.); use --network private and reach the endpoint with `mistral-deploy tunnel`")
    with pytest.raises(RecipeError, match=r"^resources.spot: slurm has no spot instances"):
        check_launchable(_recipe("tiny-mistral", cloud="slurm", gpu="A10G", spot=True), sdk)
    check_launchable(_recipe("tiny-mistral", cloud="slurm", gpu="A10G", ttl="1h"), sdk)  # private, autodown: fine
    check_launchable(_recipe("mistral-7b", cloud="slurm,aws", network="public"), sdk)  # aws can open it


def test_up_refuses_in_one_line_and_starts_no_api_server(tmp_path):
    """`up --cloud slurm` on a public recipe, `up`/`render --cloud mars`: one line, exit 3, nothing started."""
    import subprocess
    import sys

    from cloud_support import skypilot_api_servers

    before = skypilot_api_servers()
    for argv, expected in (
        (["up", "mistral-7b", "--cloud", "slurm", "--gpu", "A10G"],
         "error: network.mode: public needs the gateway port opened, which SkyPilot cannot do on slurm"),
        (["up", "mistral-7b", "--cloud", "mars"],
         "error: built-in recipe mistral-7b: --cloud (resources.cloud): unknown infrastructure 'mars'"),
        (["render", "mistral-7b", "--cloud", "mars"],
         "error: built-in recipe mistral-7b: --cloud (resources.cloud): unknown infrastructure 'mars'"),
    ):
        done = subprocess.run([sys.executable, "-m", "mistral_deploy", *argv], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 3, done.stderr
        assert done.stdout == "" and done.stderr.startswith(expected), done.stderr
        assert "Traceback" not in done.stderr
    assert skypilot_api_servers() - before == set()
    assert not (Path(os.environ["HOME"]) / ".sky" / "api_server").exists()


def test_mistral_models_on_the_hub_are_gated_and_their_recipes_ask_for_the_token():
    """Mistral AI gates its Hub repositories (a contact-information agreement): without HF_TOKEN the VM
    gets a 401, so every built-in recipe of a mistralai/ model asks for it at launch."""
    from mistral_deploy.recipe import builtin_recipe_names

    for name in builtin_recipe_names():
        recipe = load_recipe(name).recipe
        if recipe.model.id.startswith("mistralai/"):
            assert recipe.model.hf_token, name
