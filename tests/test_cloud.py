"""Cloud and SkyServe deployments, end to end, with the cloud account faked at the SkyPilot SDK boundary.

Our code runs for real: recipe, rendering, state store, keys, the readiness probe, TLS pinning; the
"VM" is a real HTTP(S) server on 127.0.0.1 (tests/cloud_support.VmEndpoint) that only admits the keys
the launch passed as SkyPilot secrets. Only skysdk.SkySdk is replaced (tests/cloud_support.FakeSky).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud_support import HF, FakeSky, VmEndpoint, fake, probe_key_of, vm  # noqa: F401  (fixtures)
from mistral_deploy import skysdk
from mistral_deploy.cloud import CloudBackend, backend_for_kind
from mistral_deploy.serve import ServeBackend
from mistral_deploy.errors import CloudError, MistralDeployError, NotReadyError, RecipeError
from mistral_deploy.recipe import Overrides, Recipe, load_recipe, validate_recipe_data
from mistral_deploy.gateway import key_hash
from mistral_deploy.render import HF_TOKEN_FILE, HF_TOKEN_SECRET, KEY_HASHES_SECRET, PROBE_KEY_SECRET
from mistral_deploy.state import StateStore

# the readiness probe is mistral_deploy.probe (written beside the local backend)
pytest.importorskip("mistral_deploy.probe")

FAST_HEALTH = {"readiness_timeout": 30, "probe_interval": 0.05, "probe_timeout": 5}


@pytest.fixture(scope="module", autouse=True)
def no_skypilot_api_server_left():
    """Nothing here may start SkyPilot's API server (every SDK request would); none is left running."""
    from cloud_support import skypilot_api_servers

    before = skypilot_api_servers()
    yield
    assert skypilot_api_servers() - before == set()



class Phases:
    """Collects what a backend reports (the Progress interface: phase, done, fail)."""

    def __init__(self) -> None:
        self.phases: list[str] = []
        self.details: list[str] = []
        self.done_message = ""
        self.fail_message = ""

    def phase(self, name: str, detail: str = "") -> None:
        if not self.phases or self.phases[-1] != name:
            self.phases.append(name)
        self.details.append(detail)

    def done(self, message: str) -> None:
        self.done_message = message

    def fail(self, message: str) -> None:
        self.fail_message = message


def make_recipe(ref: str = "mistral-7b-instruct", *, extra: dict[str, Any] | None = None, **flags: Any) -> Recipe:
    flags.setdefault("cloud", "aws")
    flags.setdefault("gpu", "A10G")
    data = load_recipe(ref, Overrides(**flags)).recipe.to_yaml_config()
    data["health"] = dict(FAST_HEALTH)
    data.update(extra or {})
    return validate_recipe_data(data, "test").recipe


@pytest.fixture
def store() -> StateStore:
    return StateStore()


def _authed_models(endpoint: str, key: str, ca: str | None) -> httpx.Response:
    import ssl

    verify: Any = ssl.create_default_context(cafile=ca) if ca else True
    with httpx.Client(verify=verify, timeout=5) as client:
        return client.get(f"{endpoint}/models", headers={"Authorization": f"Bearer {key}"})


# --------------------------------------------------------------------------------------------------
# up, per network mode


def test_up_public_launches_with_secrets_pins_the_vm_certificate_and_probes(fake, vm, store, tmp_path):
    vm.start(tls_dir=tmp_path / "vm-tls")
    progress = Phases()
    recipe = make_recipe()

    deployment = CloudBackend().up(recipe, store, progress)

    # launch, then the job's log (phases), the VM's certificate once setup is done, the opened port
    assert fake.names() == ["offered_gpus", "launch", "hourly_price", "tail_job", "write_head_file",
                            "read_head_file", "endpoint"]
    launch = next(c for c in fake.calls if c.method == "launch")
    keys = store.read_api_keys(recipe.name)
    assert len(keys) == 1
    # the VM receives the key's hash, never the key; the Hugging Face token is no SkyPilot secret: it is
    # written over SSH into a 0600 file once the job runs
    assert launch.args["secrets"] == {KEY_HASHES_SECRET: f"key-1:{key_hash(keys[0])}"}
    assert keys[0] not in str(launch.args) and HF not in str(launch.args)
    written = [c for c in fake.calls if c.method == "write_head_file"]
    assert [(c.args["path"], c.args["data"]) for c in written] == [(HF_TOKEN_FILE, f"HF_TOKEN={HF}\n")]
    assert launch.args["task_config"]["secrets"] == {KEY_HASHES_SECRET: None}
    assert "envs" not in launch.args["task_config"] or KEY_HASHES_SECRET not in launch.args["task_config"]["envs"]
    assert launch.args["cluster_name"] == "md-mistral-7b-instruct"
    assert launch.args["global_config"] == {}
    # the certificate was read from the VM over SSH, the gateway port looked up through sky.endpoints
    assert {"read_head_file", "endpoint", "tail_job", "hourly_price"} <= set(fake.names())
    read = next(c for c in fake.calls if c.method == "read_head_file")
    assert read.args["path"] == "~/.mistral-deploy/gateway/tls/cert.pem"

    assert deployment.phase == "ready"
    assert deployment.endpoint == f"https://127.0.0.1:{vm.port}/v1"
    assert Path(deployment.tls_ca).read_text() == vm.cert_pem
    assert stat.S_IMODE(os.stat(store.dir(recipe.name) / "api_keys").st_mode) == 0o600
    # the readiness probe reached the VM with the key, over the pinned TLS
    assert any(auth == f"Bearer {keys[0]}" for _, _, auth in vm.requests)
    assert _authed_models(deployment.endpoint, keys[0], deployment.tls_ca).status_code == 200
    assert _authed_models(deployment.endpoint, "md-wrong-key-000000000000000000", deployment.tls_ca).status_code == 401
    # phases streamed from SkyPilot's lines and the scripts' markers
    for name in ("provisioning", "setup", "image-pull", "engine-start", "weights"):
        assert name in progress.phases
    assert progress.phases.index("provisioning") < progress.phases.index("setup") < progress.phases.index("image-pull")
    assert "$1.01/hour" in progress.done_message and "g5.xlarge" in progress.done_message
    record = store.load(recipe.name)
    assert record.phase == "ready" and record.details["cluster"] == "md-mistral-7b-instruct"
    assert record.details["hourly_price"] == pytest.approx(1.006)
    assert keys[0] not in (store.dir(recipe.name) / "deployment.json").read_text()


def test_up_private_reaches_the_gateway_through_a_tunnel_and_status_reprobes(fake, vm, store):
    vm.start()
    recipe = make_recipe(network="private")
    deployment = CloudBackend().up(recipe, store, Phases())

    tunnel_calls = [c for c in fake.calls if c.method == "open_tunnel"]
    assert tunnel_calls and tunnel_calls[0].args["remote_host"] == "127.0.0.1"
    assert tunnel_calls[0].args["remote_port"] == recipe.network.port
    assert "endpoint" not in fake.names()  # nothing is opened to the internet
    assert "read_head_file" not in fake.names()  # no TLS by default on a private endpoint
    port = deployment.details["tunnel_port"]
    assert deployment.endpoint == f"http://127.0.0.1:{port}/v1"
    assert not fake.tunnels[0].alive()  # up's own tunnel is closed when up returns

    status = CloudBackend().status(store.load(recipe.name))
    assert status["healthy"] is True and status["network"] == "private"
    assert status["endpoint"] == deployment.endpoint
    assert len([c for c in fake.calls if c.method == "open_tunnel"]) == 2  # status probed over its own


def test_up_vpc_uses_the_private_address_and_skypilots_internal_ip_config(fake, vm, store):
    vm.start()
    recipe = make_recipe(extra={"network": {"mode": "vpc", "port": vm.port, "vpc_name": "md-test-vpc"}})
    deployment = CloudBackend().up(recipe, store, Phases())

    launch = next(c for c in fake.calls if c.method == "launch")
    assert launch.args["global_config"] == {"aws": {"use_internal_ips": True, "vpc_names": ["md-test-vpc"]}}
    # opened, but the VM has only a private address: reachable inside the VPC, where the gateway admits
    # the private ranges alone
    assert launch.args["task_config"]["resources"]["ports"] == [vm.port]
    assert recipe.network.allow == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
    assert deployment.endpoint == f"http://127.0.0.1:{vm.port}/v1"
    assert "endpoint" not in fake.names() and "open_tunnel" not in fake.names()
    assert CloudBackend().status(store.load(recipe.name))["ip"] == "127.0.0.1"


def test_status_sees_a_preempted_spot_vm_and_a_cluster_that_is_gone(fake, vm, store, tmp_path):
    """The record says ready; the cloud says otherwise: status reports it (asking SkyPilot to refresh)."""
    import dataclasses

    vm.start(tls_dir=tmp_path / "tls")
    recipe = make_recipe(spot=True)
    CloudBackend().up(recipe, store, Phases())
    cluster = "md-mistral-7b-instruct"
    fake.clusters[cluster] = dataclasses.replace(fake.clusters[cluster], status="STOPPED")
    status = CloudBackend().status(store.load(recipe.name))
    assert status["phase"] == "down" and status["healthy"] is False
    assert "preempted spot VM" in status["error"] and "use replicas" in status["error"]
    assert fake.calls[-1].method == "cluster" and fake.calls[-1].args["refresh"] is True
    del fake.clusters[cluster]
    status = CloudBackend().status(store.load(recipe.name))
    assert status["phase"] == "gone" and status["cluster_status"] == "missing"
    assert store.load(recipe.name).phase == "ready"  # status reports; it changes no record
    CloudBackend().down(store.load(recipe.name), store, Phases())  # a cluster already gone: just the record
    assert store.list() == []


def test_ttl_and_spot_reach_the_launched_task(fake, vm, store, tmp_path):
    vm.start(tls_dir=tmp_path / "tls")
    recipe = make_recipe(ttl="4h", spot=True)
    CloudBackend().up(recipe, store, Phases())

    task = fake.tasks["md-mistral-7b-instruct"]
    assert [r.use_spot for r in task.resources] == [True, False]  # spot first, on-demand fallback
    for res in task.resources:
        stop = res.autostop_config
        assert (stop.idle_minutes, stop.down, stop.wait_for.value) == (240, True, "none")
    status = CloudBackend().status(store.load(recipe.name))
    assert status["autostop_minutes"] == 240 and status["spot"] is True


# --------------------------------------------------------------------------------------------------
# status, logs, down


def test_status_ip_logs_and_down(fake, vm, store, tmp_path):
    vm.start(tls_dir=tmp_path / "tls")
    recipe = make_recipe()
    backend = CloudBackend()
    backend.up(recipe, store, Phases())
    deployment = store.load(recipe.name)

    status = backend.status(deployment)
    assert status["healthy"] is True
    assert status["ip"] == "127.0.0.1"  # the cluster's head address
    assert status["cluster_status"] == "UP"
    assert {"name", "backend", "phase", "healthy", "endpoint", "ip"} <= set(status)

    lines = list(backend.logs(deployment, follow=False, lines=2))
    assert lines == fake.job_lines[-2:]

    vm.ready = False
    assert backend.status(deployment)["healthy"] is False

    progress = Phases()
    backend.down(deployment, store, progress)
    assert next(c for c in fake.calls if c.method == "down").args == {"cluster_name": "md-mistral-7b-instruct"}
    assert store.list() == []
    assert "md-mistral-7b-instruct" not in fake.clusters


def test_status_of_a_cluster_gone_behind_our_back(fake, vm, store, tmp_path):
    vm.start(tls_dir=tmp_path / "tls")
    recipe = make_recipe()
    CloudBackend().up(recipe, store, Phases())
    fake.clusters.clear()  # e.g. the TTL's autodown fired
    status = CloudBackend().status(store.load(recipe.name))
    assert status["cluster_status"] == "missing" and status["healthy"] is False


# --------------------------------------------------------------------------------------------------
# failures


def test_quota_error_is_one_line_exit_9_and_leaves_no_record(fake, vm, store):
    from sky import exceptions as sx

    def refuse() -> None:
        fake.clusters.pop("md-mistral-7b-instruct", None)  # SkyPilot's failover cleans up what it started
        raise sx.ResourcesUnavailableError(
            "Failed to provision all possible launchable resources.",
            failover_history=[Exception("An error occurred (VcpuLimitExceeded) when calling the RunInstances "
                                        "operation: You have requested more vCPU capacity than your current "
                                        "vCPU limit of 0 allows")])

    fake.launch_raises = refuse
    with pytest.raises(CloudError) as info:
        CloudBackend().up(make_recipe(), store, Phases())
    assert info.value.exit_code == 9
    assert "\n" not in info.value.message and "quota" in info.value.message
    assert store.list() == []  # nothing was created, so nothing is recorded


def test_failure_after_provisioning_keeps_the_record_for_down(fake, vm, store):
    def setup_failed() -> None:
        raise RuntimeError("Failed to set up the cluster: docker: command not found")

    fake.launch_raises = setup_failed  # the cluster exists (INIT) when the launch fails
    with pytest.raises(CloudError) as info:
        CloudBackend().up(make_recipe(), store, Phases())
    assert "docker: command not found" in info.value.message
    assert "mistral-deploy down mistral-7b-instruct" in (info.value.hint or "")
    record = store.load("mistral-7b-instruct")
    assert record.phase == "failed"
    CloudBackend().down(record, store, Phases())
    assert store.list() == [] and "down" in fake.names()


def test_ctrl_c_during_launch_leaves_the_deployment_recorded_and_down_cleans_it(fake, vm, store):
    def interrupt() -> None:
        raise KeyboardInterrupt

    fake.launch_raises = interrupt
    progress = Phases()
    with pytest.raises(KeyboardInterrupt):
        CloudBackend().up(make_recipe(), store, progress)

    record = store.load("mistral-7b-instruct")
    assert record.phase == "failed" and "interrupted" in record.details["error"]
    assert record.details["cluster"] == "md-mistral-7b-instruct"
    assert "mistral-deploy down mistral-7b-instruct" in progress.fail_message

    backend = backend_for_kind(record.backend)
    backend.down(record, store, Phases())
    assert next(c for c in fake.calls if c.method == "down").args["cluster_name"] == "md-mistral-7b-instruct"
    assert store.list() == []


def test_engine_that_dies_fails_readiness_with_the_log_tail_and_keeps_the_cluster(fake, vm, store):
    vm.start()
    vm.ready = False
    fake.job_ends = True
    fake.job_lines = fake.job_lines + ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    recipe = make_recipe(network="private")
    started = time.monotonic()
    with pytest.raises(NotReadyError) as info:
        CloudBackend().up(recipe, store, Phases())
    assert time.monotonic() - started < FAST_HEALTH["readiness_timeout"]  # the dead job ends the wait early
    assert "CUDA out of memory" in info.value.log_tail
    assert info.value.exit_code == 8
    assert "mistral-deploy down" in (info.value.hint or "")
    assert store.load(recipe.name).phase == "failed"
    assert "down" not in fake.names()


def test_up_still_pins_and_probes_when_the_job_log_cannot_be_followed(fake, vm, store, tmp_path):
    vm.start(tls_dir=tmp_path / "tls")
    fake.job_log_breaks = True
    deployment = CloudBackend().up(make_recipe(), store, Phases())
    assert deployment.phase == "ready" and Path(deployment.tls_ca).read_text() == vm.cert_pem


def test_up_across_two_nodes_hands_each_node_its_own_token_file(fake, vm, store, tmp_path):
    """A model across two nodes: one cluster of two (SkyPilot's num_nodes), the Hugging Face token written
    over SSH to each node (a file of its own: nodes may share their home), never a SkyPilot secret."""
    vm.start(tls_dir=tmp_path / "vm-tls")
    recipe = make_recipe(nodes=2)
    deployment = CloudBackend().up(recipe, store, Phases())
    # the price recorded (status, cost so far, bench's $/Mtok) is that of both nodes
    assert fake.price and deployment.details["hourly_price"] == pytest.approx(2 * fake.price)
    launch = next(c for c in fake.calls if c.method == "launch")
    assert launch.args["task_config"]["num_nodes"] == 2
    assert launch.args["task_config"]["secrets"] == {KEY_HASHES_SECRET: None} and HF not in str(launch.args)
    written = [(c.args["node"], c.args["path"], c.args["data"]) for c in fake.calls if c.method == "write_head_file"]
    assert written == [(0, HF_TOKEN_FILE, f"HF_TOKEN={HF}\n"),
                       (1, HF_TOKEN_FILE.replace(".env", "-node1.env"), f"HF_TOKEN={HF}\n")]
    # the worker's run script waits for that file
    assert '-node$NODE_RANK.env' in launch.args["task_config"]["run"]


@pytest.mark.parametrize("extra, field", [({"resources": {"cloud": "local", "num_nodes": 2}}, "num_nodes"),
                                          ({"replicas": {"min": 2}}, "num_nodes")])
def test_several_nodes_are_refused_where_they_cannot_run(extra, field):
    data = load_recipe("mistral-7b-instruct", Overrides(cloud="aws", gpu="A10G", nodes=2)).recipe.to_yaml_config()
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    with pytest.raises(RecipeError, match=f"resources.{field}"):
        validate_recipe_data(data, "test")


def test_missing_hf_token_is_reported_before_anything_is_created(fake, vm, store, monkeypatch):
    monkeypatch.delenv(HF_TOKEN_SECRET)
    with pytest.raises(MistralDeployError, match="HF_TOKEN"):
        CloudBackend().up(make_recipe(), store, Phases())
    # only questions were asked (what the cloud offers), nothing launched
    assert store.list() == [] and fake.names() == ["offered_gpus"]


# --------------------------------------------------------------------------------------------------
# SkyServe


def _service_recipe(**extra: Any) -> Recipe:
    return make_recipe(extra={"replicas": {"min": 2, "max": 4, "target_qps": 5}, **extra})


def test_serve_up_status_down(fake, vm, store):
    vm.start()
    fake.controller_host = "127.0.0.1"  # the user's SkyServe controller is already up
    recipe = _service_recipe()
    backend = ServeBackend()
    progress = Phases()
    deployment = backend.up(recipe, store, progress)

    up = next(c for c in fake.calls if c.method == "serve_up")
    keys = store.read_api_keys(recipe.name)
    probe_key = probe_key_of(up)
    assert probe_key not in keys  # SkyServe's probe has a key of its own
    assert up.args["secrets"][KEY_HASHES_SECRET].split() == (
        [f"key-{n}:{key_hash(k)}" for n, k in enumerate(keys, 1)] + [f"probe:{key_hash(probe_key)}"])
    assert up.args["task_config"]["secrets"] == {KEY_HASHES_SECRET: None, PROBE_KEY_SECRET: None, HF_TOKEN_SECRET: None}
    task = fake.tasks["md-mistral-7b-instruct"]
    assert task.service.readiness_headers == {"Authorization": f"Bearer {probe_key}"}
    assert (task.service.min_replicas, task.service.max_replicas) == (2, 4)
    assert up.args["task_config"]["resources"]["ports"] == [8443]  # each replica opens it for the load balancer
    # TLS ends at the load balancer, with a certificate made here for the controller's address
    tls = up.args["task_config"]["service"]["tls"]
    assert Path(tls["keyfile"]).parent == store.dir(recipe.name) / "service-tls"
    assert stat.S_IMODE(os.stat(tls["keyfile"]).st_mode) == 0o600
    assert deployment.endpoint == f"https://127.0.0.1:{vm.port}/v1"
    assert _authed_models(deployment.endpoint, keys[0], deployment.tls_ca).status_code == 200
    assert deployment.phase == "ready" and deployment.details["replicas"] == 2
    assert "serve_up" in fake.names() and fake.names().count("serve_up") == 1

    status = backend.status(store.load(recipe.name))
    assert status["healthy"] is True and status["service_status"] == "READY"
    assert [r["status"] for r in status["replicas"]] == ["READY", "READY"]
    assert status["ip"] == "127.0.0.1"
    assert list(backend.logs(store.load(recipe.name), follow=False, lines=1)) == fake.job_lines[-1:]

    backend.down(store.load(recipe.name), store, Phases())
    assert next(c for c in fake.calls if c.method == "serve_down").args == {"service_name": "md-mistral-7b-instruct"}
    assert store.list() == [] and fake.services == {}


def test_serve_scaled_to_zero_is_up_once_the_service_is(fake, vm, store):
    """min 0: SkyServe's NO_REPLICA is the normal state; `up` returns once the service exists and says what
    the first request does, without waiting for a replica that will not start before a request."""
    vm.start()
    fake.controller_host = "127.0.0.1"
    phases = Phases()
    recipe = make_recipe(extra={"replicas": {"min": 0, "max": 2, "target_qps": 1}})
    deployment = ServeBackend().up(recipe, store, phases)
    assert "tail_job" not in fake.names() and vm.requests == []  # no replica was waited for or probed
    assert deployment.phase == "ready" and deployment.endpoint.endswith("/v1")
    assert "the first request" in phases.done_message and "503" in phases.done_message
    assert fake.services["md-mistral-7b-instruct"].status == "NO_REPLICA"
    # `status` sends the load balancer nothing while no replica is READY: SkyServe's autoscaler counts every
    # request it gets, and a health check would wake a replica by itself (a GPU VM, paid for)
    status = ServeBackend().status(store.load(recipe.name))
    assert status["phase"] == "idle" and status["healthy"] is False and status["service_status"] == "NO_REPLICA"
    assert vm.requests == [] and "no replica runs (min: 0)" in status["warning"]
    import dataclasses

    service = fake.services["md-mistral-7b-instruct"]
    for state, said in (("PROVISIONING", "a replica is starting (1 PROVISIONING)"),
                        ("SHUTTING_DOWN", "no replica runs (min: 0)")):  # scaling back down: not waking
        fake.services[service.name] = dataclasses.replace(service, replicas=(skysdk.ReplicaInfo(
            replica_id=1, status=state, endpoint=None, version=1, is_spot=False),))
        status = ServeBackend().status(store.load(recipe.name))
        assert status["phase"] == "idle" and said in status["warning"] and vm.requests == []


def test_scaling_to_zero_needs_somewhere_to_scale_to():
    with pytest.raises(RecipeError, match="replicas: min 0 scales to zero: give max"):
        make_recipe(extra={"replicas": {"min": 0}})


def test_serve_first_service_reissues_the_certificate_for_the_new_controller(fake, vm, store):
    vm.start()
    recipe = _service_recipe()
    deployment = ServeBackend().up(recipe, store, Phases())
    assert fake.names().count("serve_up") == 2
    assert [c.args["service_name"] for c in fake.calls if c.method == "serve_down"] == ["md-mistral-7b-instruct"]
    assert deployment.details["service"] == "md-mistral-7b-instruct-lb"
    keys = store.read_api_keys(recipe.name)
    assert _authed_models(deployment.endpoint, keys[0], deployment.tls_ca).status_code == 200


def test_serve_spot_replicas_fall_back_to_on_demand(fake, vm, store):
    vm.start()
    fake.controller_host = "127.0.0.1"
    recipe = make_recipe(spot=True, extra={"replicas": 2})
    ServeBackend().up(recipe, store, Phases())
    task = fake.tasks["md-mistral-7b-instruct"]
    assert all(r.use_spot for r in task.resources)
    assert task.service.dynamic_ondemand_fallback is True


@pytest.mark.parametrize("extra", [{"lifetime": {"ttl": "4h"}}, {"network": {"allow": ["203.0.113.0/24"]}}])
def test_serve_refuses_what_skyserve_cannot_enforce(fake, vm, store, extra):
    with pytest.raises(RecipeError):
        ServeBackend().up(_service_recipe(**extra), store, Phases())
    assert store.list() == [] and fake.calls == []


# --------------------------------------------------------------------------------------------------
# the tunnel command


def test_tunnel_command_forwards_a_local_port_until_it_ends(fake, vm, store):
    from typer.testing import CliRunner

    from mistral_deploy.cli import _register, app

    vm.start()
    recipe = make_recipe(network="private")
    deployment = CloudBackend().up(recipe, store, Phases())
    keys = store.read_api_keys(recipe.name)
    _register()
    local = skysdk.free_port()
    result: dict[str, Any] = {}

    def run() -> None:
        result["r"] = CliRunner().invoke(app, ["tunnel", recipe.name, "--port", str(local)])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not skysdk.port_open("127.0.0.1", local) and time.monotonic() < deadline:
        time.sleep(0.05)
    response = _authed_models(f"http://127.0.0.1:{local}/v1", keys[0], None)
    assert response.status_code == 200
    fake.close_tunnels()  # what Ctrl-C / the end of ssh does
    thread.join(timeout=10)
    r = result["r"]
    assert r.exit_code == 0, r.output
    assert f"http://127.0.0.1:{local}/v1" in r.output
    assert deployment.details["tunnel_port"] != local


def test_tunnel_command_refuses_a_public_endpoint(fake, vm, store, tmp_path):
    from typer.testing import CliRunner

    from mistral_deploy.cli import _register, app

    vm.start(tls_dir=tmp_path / "tls")
    CloudBackend().up(make_recipe(), store, Phases())
    _register()
    r = CliRunner().invoke(app, ["tunnel", "mistral-7b-instruct"])
    assert r.exit_code != 0


# --------------------------------------------------------------------------------------------------
# the same through the CLI: up, status --ip / --json, env, down


def test_cli_up_status_ip_env_and_down_on_aws(fake, vm, tmp_path, monkeypatch):
    import json

    from _cli import run_cli

    vm.start(tls_dir=tmp_path / "tls")
    recipe_file = tmp_path / "r.yaml"
    data = make_recipe().to_yaml_config()
    import yaml

    recipe_file.write_text(yaml.safe_dump(data))
    up = run_cli("up", str(recipe_file), "--cloud", "aws", "--gpu", "A10G", "--json")
    assert up.exit_code == 0, up.stderr
    summary = json.loads(up.stdout)
    assert summary["phase"] == "ready" and summary["endpoint"] == f"https://127.0.0.1:{vm.port}/v1"
    assert summary["hourly_price"] == pytest.approx(1.006)
    keys = StateStore().read_api_keys("mistral-7b-instruct")
    assert keys[0] not in up.stdout + up.stderr  # the key is only ever shown by `env`

    ip = run_cli("status", "--ip")
    assert ip.exit_code == 0 and ip.stdout.strip() == "127.0.0.1"
    status = json.loads(run_cli("status", "mistral-7b-instruct", "--json").stdout)
    assert status["healthy"] is True and status["cluster_status"] == "UP"

    env = run_cli("env", "mistral-7b-instruct", "--json")
    variables = json.loads(env.stdout)
    assert variables["OPENAI_API_KEY"] == keys[0] and variables["MISTRAL_DEPLOY_CA_FILE"] == summary["tls_ca"]
    # the trust bundle: the system's CAs and the pinned certificate, so other HTTPS keeps working
    bundle = Path(variables["SSL_CERT_FILE"]).read_text()
    assert Path(summary["tls_ca"]).read_text() in bundle and bundle.count("BEGIN CERTIFICATE") > 10
    assert _authed_models(variables["OPENAI_BASE_URL"], variables["OPENAI_API_KEY"],
                          variables["SSL_CERT_FILE"]).status_code == 200

    down = run_cli("down", "mistral-7b-instruct")
    assert down.exit_code == 0, down.stderr
    assert next(c for c in fake.calls if c.method == "down").args == {"cluster_name": "md-mistral-7b-instruct"}
    assert run_cli("status", "mistral-7b-instruct").exit_code == 5


def test_cli_up_quota_error_is_one_line_exit_9(fake, vm):
    from sky import exceptions as sx

    from _cli import run_cli

    def refuse() -> None:
        fake.clusters.pop("md-mistral-7b-instruct", None)
        raise sx.ResourcesUnavailableError(
            "Failed to provision all possible launchable resources.",
            failover_history=[Exception("VcpuLimitExceeded: You have requested more vCPU capacity than your "
                                        "current vCPU limit of 0 allows")])

    fake.launch_raises = refuse
    result = run_cli("up", "--cloud", "aws", "--gpu", "A10G")
    assert result.exit_code == 9
    assert "Traceback" not in result.stderr and "quota" in result.stderr
    assert run_cli("status", "--json").stdout.strip().startswith("{")
    assert StateStore().list() == []


# --------------------------------------------------------------------------------------------------
# SkyServe as its real controller behaves (issue 17): replica states, consolidation mode, rollouts


def test_a_service_is_judged_by_its_replicas_not_by_no_replica(fake, vm, store):
    """SkyServe says NO_REPLICA until a replica is READY, while the first ones start too: that is no failure.
    It is one once SkyServe gives up on the service, or on every replica."""
    from mistral_deploy.skysdk import ReplicaInfo, ServiceInfo

    backend = ServeBackend()
    backend._ALIVE_EVERY = 0
    phases = Phases()

    def judged(status: str, *states: str) -> bool:
        fake.services["md-x"] = ServiceInfo(name="md-x", status=status, replicas=tuple(
            ReplicaInfo(replica_id=i, status=s, version=1) for i, s in enumerate(states, 1)))
        return backend._alive_check("md-x", phases.phase)()

    assert judged("NO_REPLICA") is True  # the controller has not made the replicas' records yet
    assert judged("NO_REPLICA", "PENDING", "PROVISIONING") is True
    assert phases.details[-1] == "1/2 replicas provisioning"
    assert judged("NO_REPLICA", "STARTING", "FAILED_PROVISION") is True  # one failed, one still coming
    assert phases.details[-1] == "1/2 replicas starting"
    assert judged("NO_REPLICA", "FAILED_PROVISION", "FAILED_SETUP") is False
    assert judged("FAILED") is False and judged("CONTROLLER_FAILED", "READY") is False
    assert judged("READY", "READY", "STARTING") is True


def test_consolidation_mode_admits_this_machines_addresses_and_pins_localhost(fake, vm, store):
    """Consolidation mode: SkyServe reports the load balancer as localhost:PORT, and it connects to the
    replicas from the API server's machine: replicas admit that machine's addresses, not "localhost"."""
    vm.start()
    fake.consolidation_mode = True
    recipe = _service_recipe()
    deployment = ServeBackend().up(recipe, store, Phases())
    assert fake.names().count("serve_up") == 1  # no second launch: the address was known before
    up = next(c for c in fake.calls if c.method == "serve_up")
    admitted = up.args["task_config"]["envs"]["MISTRAL_DEPLOY_LOAD_BALANCER"].split()
    assert admitted == skysdk.host_addresses() and admitted and "localhost" not in admitted
    assert deployment.endpoint == f"https://localhost:{vm.port}/v1"
    keys = store.read_api_keys(recipe.name)
    assert _authed_models(deployment.endpoint, keys[0], deployment.tls_ca).status_code == 200  # localhost pinned
    assert deployment.details["lb_sources"] == admitted and deployment.details["consolidation_mode"] is True


def test_consolidation_mode_with_a_remote_api_server_uses_its_address(fake, vm, store):
    vm.start()
    fake.consolidation_mode = True
    fake.api_host = "127.0.0.1"  # a remote API server, here named by an address
    deployment = ServeBackend().up(_service_recipe(), store, Phases())
    up = next(c for c in fake.calls if c.method == "serve_up")
    assert up.args["task_config"]["envs"]["MISTRAL_DEPLOY_LOAD_BALANCER"] == "127.0.0.1"
    assert deployment.endpoint == f"https://127.0.0.1:{vm.port}/v1"  # not SkyServe's "localhost"
    keys = store.read_api_keys(deployment.name)
    assert _authed_models(deployment.endpoint, keys[0], deployment.tls_ca).status_code == 200


def _serve_up(fake, vm, store, **extra: Any) -> tuple[ServeBackend, Recipe]:
    vm.start()
    fake.controller_host = "127.0.0.1"
    recipe = _service_recipe(**extra)
    backend = ServeBackend()
    backend._ROLLOUT_EVERY = 0.05
    backend.up(recipe, store, Phases())
    return backend, recipe


def _keys_cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from mistral_deploy.cli import _register, app

    _register()
    return CliRunner().invoke(app, ["keys", *args])


def test_a_revoke_that_has_not_reached_every_replica_is_pending_until_it_has(fake, vm, store, monkeypatch):
    from cloud_support import probe_key_of

    monkeypatch.setattr(ServeBackend, "_ROLLOUT_EVERY", 0.05)
    backend, recipe = _serve_up(fake, vm, store, health={**FAST_HEALTH, "readiness_timeout": 1})
    keys = store.read_api_keys(recipe.name)
    added = _keys_cli("add", recipe.name)
    assert added.exit_code == 0, added.output
    fake.update_outcome = "rolling"  # the new replicas start; the old ones serve, with the old keys
    revoked = _keys_cli("revoke", recipe.name, "key-1")
    assert revoked.exit_code == 0, revoked.output
    assert "pending" in revoked.output and "key-1 still accepted" in revoked.output
    assert _authed_models(f"https://127.0.0.1:{vm.port}/v1", keys[0], store.load(recipe.name).tls_ca).status_code == 200
    listed = _keys_cli("list", recipe.name)
    assert "key-1" in listed.output and "revoke pending" in listed.output  # never listed as gone while accepted
    status = backend.status(store.load(recipe.name), store)
    assert status["rollout"]["state"] == "rolling" and "key-1 still accepted" in status["warning"]
    # SkyServe finishes: the old replicas are gone, the key is refused everywhere
    update = [c for c in fake.calls if c.method == "serve_update"][-1]
    fake.finish_rollout(recipe and store.load(recipe.name).details["service"], update.args["secrets"])
    assert _authed_models(f"https://127.0.0.1:{vm.port}/v1", keys[0], store.load(recipe.name).tls_ca).status_code == 401
    listed = _keys_cli("list", recipe.name)
    assert "key-1" not in listed.output and "key-2" in listed.output
    assert backend.status(store.load(recipe.name), store)["rollout"] is None
    assert probe_key_of(update)  # the probe key travelled with every update


def test_a_revoke_waits_for_the_rollout_and_says_so_when_done(fake, vm, store, monkeypatch):
    monkeypatch.setattr(ServeBackend, "_ROLLOUT_EVERY", 0.05)
    backend, recipe = _serve_up(fake, vm, store)
    _keys_cli("add", recipe.name)
    revoked = _keys_cli("revoke", recipe.name, "key-1")
    assert revoked.exit_code == 0, revoked.output
    assert "version 3 serves alone" in revoked.output and "key-1 refused by every replica" in revoked.output
    assert "key-1" not in _keys_cli("list", recipe.name).output


def test_a_failed_update_is_not_recorded_as_applied_and_shows_as_drift(fake, vm, store, monkeypatch):
    monkeypatch.setattr(ServeBackend, "_ROLLOUT_EVERY", 0.05)
    backend, recipe = _serve_up(fake, vm, store)
    before = store.load(recipe.name).recipe
    changed = recipe.model_copy(update={"model": recipe.model.model_copy(update={"max_model_len": 4096})})
    fake.update_outcome = "failed"
    with pytest.raises(CloudError, match="update \\(recipe\\) failed: version 2 failed"):
        backend.apply(store.load(recipe.name), changed, None, store, Phases())
    record = store.load(recipe.name)
    assert record.recipe == before  # not applied
    assert record.details["rollout"]["state"] == "failed" and record.details["rollout"]["version"] == 2
    status = backend.status(record, store)
    assert status["warning"].startswith("drift: the last update (recipe) failed and the old version serves")
    # a later update that serves alone clears it, and only then is its recipe recorded
    fake.update_outcome = "done"
    backend.apply(store.load(recipe.name), changed, None, store, Phases())
    record = store.load(recipe.name)
    assert record.recipe == changed.to_yaml_config() and "rollout" not in record.details
    assert record.details["version"] == 3


def test_old_replicas_shutting_down_count_as_gone_once_the_load_balancer_has_synced(fake, vm, store, monkeypatch):
    """SkyServe keeps a scaled-down replica SHUTTING_DOWN for its 2-minute drain; its load balancer stops
    sending it requests at its next sync (READY replicas only): the revoke is done after that sync, not
    before, and not only once the old replica is gone."""
    from mistral_deploy import serve as serve_module
    from mistral_deploy.skysdk import LB_SYNC_SECONDS

    from sky.serve import constants

    assert LB_SYNC_SECONDS == constants.LB_CONTROLLER_SYNC_INTERVAL_SECONDS
    monkeypatch.setattr(ServeBackend, "_ROLLOUT_EVERY", 0.05)
    backend, recipe = _serve_up(fake, vm, store, health={**FAST_HEALTH, "readiness_timeout": 1})
    _keys_cli("add", recipe.name)
    fake.update_outcome = "rolling"
    revoked = _keys_cli("revoke", recipe.name, "key-1")
    assert "pending" in revoked.output
    update = [c for c in fake.calls if c.method == "serve_update"][-1]
    service = store.load(recipe.name).details["service"]
    fake.finish_rollout(service, update.args["secrets"], draining=True)
    monkeypatch.setattr(serve_module, "LB_SYNC_SECONDS", 0.3)
    monkeypatch.setattr(ServeBackend, "_LB_SYNC_MARGIN", 0.0)
    listed = _keys_cli("list", recipe.name)  # the load balancer may not have synced yet
    assert "key-1" in listed.output and "revoke pending" in listed.output
    assert "out of the load balancer at its next sync" in backend.status(store.load(recipe.name), store)["warning"]
    time.sleep(0.4)
    listed = _keys_cli("list", recipe.name)
    assert "key-1" not in listed.output and "key-2" in listed.output
    assert "SHUTTING_DOWN" in [r.status for r in fake.services[service].replicas]  # still listed, drained


def test_down_of_a_service_returns_once_skyserve_lists_it_no_more(fake, vm, store, monkeypatch):
    """`sky serve down` returns while SkyServe's controller still drains and removes the replicas (seen on
    the bed: the service listed SHUTTING_DOWN after it returned): `down` waits, showing them go."""
    monkeypatch.setattr(ServeBackend, "_ROLLOUT_EVERY", 0.05)
    backend, recipe = _serve_up(fake, vm, store)
    service = store.load(recipe.name).details["service"]
    fake.down_lingers = 3
    phases = Phases()
    backend.down(store.load(recipe.name), store, phases)
    assert service not in fake.services and not store.dir(recipe.name).exists()
    assert len([c for c in fake.calls if c.method == "serve_status" and c.args["service_name"] == service]) >= 3
    assert any("SHUTTING_DOWN" in detail for detail in phases.details), phases.details


def test_a_rollout_outlasts_a_moment_when_skyserve_status_cannot_be_read(fake, vm, store, monkeypatch):
    """SkyServe's status fails for a moment while old replicas go (seen on the bed): the wait goes on; it
    gives up only when the status stays unreadable."""
    monkeypatch.setattr(ServeBackend, "_ROLLOUT_EVERY", 0.05)
    backend, recipe = _serve_up(fake, vm, store)
    changed = recipe.model_copy(update={"model": recipe.model.model_copy(update={"max_model_len": 4096})})
    fake.status_unreadable = 2
    backend.apply(store.load(recipe.name), changed, None, store, Phases())
    record = store.load(recipe.name)
    assert record.recipe == changed.to_yaml_config() and "rollout" not in record.details
    # unreadable for good: the wait ends with SkyPilot's reason, the rollout stays recorded for `status`
    again = changed.model_copy(update={"model": changed.model.model_copy(update={"max_model_len": 2048})})
    fake.status_unreadable = 1000
    with pytest.raises(CloudError, match="Failed to fetch services"):
        backend.apply(store.load(recipe.name), again, None, store, Phases())
    fake.status_unreadable = 0
    assert store.load(recipe.name).details["rollout"]["state"] == "rolling"


def test_serve_status_retries_skyserves_race_with_a_removed_replica(monkeypatch):
    """SkyPilot 0.14.1 fails `serve status` while a replica's cluster YAML is removed: asked again, it answers."""
    from types import SimpleNamespace

    from mistral_deploy import skysdk as sdk_module

    answers: list[Any] = [RuntimeError("\x1b[31mFailed to fetch services\x1b[0m"),
                          [{"name": "md-svc", "status": "READY", "endpoint": "localhost:30001", "version": 2,
                            "replica_info": [{"replica_id": 1, "status": "READY", "endpoint": "10.0.0.1:8080",
                                              "name": "md-svc-1", "version": 2}]}]]

    def get(_request: Any) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    fake_sky = SimpleNamespace(get=get, serve=SimpleNamespace(status=lambda names: names))
    monkeypatch.setattr(sdk_module, "_sky", lambda: fake_sky)
    monkeypatch.setattr(sdk_module.SkySdk, "_SERVE_STATUS_RETRY_AFTER", 0.0)
    info = sdk_module.SkySdk().serve_status("md-svc")
    assert info is not None and info.status == "READY" and info.replicas[0].version == 2 and not answers
    # any other failure is not retried
    answers[:] = [RuntimeError("cannot reach the API server"), []]
    with pytest.raises(CloudError, match="cannot reach the API server"):
        sdk_module.SkySdk().serve_status("md-svc")
    assert answers == [[]]


def test_updates_keep_the_probe_key_so_a_scaling_change_can_keep_its_replicas(fake, vm, store, monkeypatch):
    """SkyServe reuses a replica on update when the task differs only in its `service` section: the probe
    key (a secret) stays the same across updates, so a replicas.max or target_qps change keeps the GPUs."""
    monkeypatch.setattr(ServeBackend, "_ROLLOUT_EVERY", 0.05)
    backend, recipe = _serve_up(fake, vm, store)
    up = next(c for c in fake.calls if c.method == "serve_up")
    scaled = recipe.model_copy(update={"replicas": recipe.replicas.model_copy(update={"max": 6, "target_qps": 9})})
    backend.apply(store.load(recipe.name), scaled, None, store, Phases())
    update = [c for c in fake.calls if c.method == "serve_update"][-1]
    assert update.args["secrets"] == up.args["secrets"]
    without_service = [{k: v for k, v in c.args["task_config"].items() if k != "service"} for c in (up, update)]
    assert without_service[0] == without_service[1]
    assert update.args["task_config"]["service"] != up.args["task_config"]["service"]
    # rotated only when asked
    rotated = _keys_cli("revoke", recipe.name, "probe")
    assert rotated.exit_code == 0, rotated.output
    last = [c for c in fake.calls if c.method == "serve_update"][-1]
    assert probe_key_of(last) != probe_key_of(up)
    assert stat.S_IMODE(os.stat(store.dir(recipe.name) / "probe_key").st_mode) == 0o600


def test_a_change_during_a_rollout_keeps_what_is_still_rolling_out(fake, vm, store, monkeypatch):
    """A keys change while an engine change rolls out carries the new engine (not the recorded one), and a
    revoke still pending stays pending in the next rollout (its old replicas are that one's old ones too)."""
    monkeypatch.setattr(ServeBackend, "_ROLLOUT_EVERY", 0.05)
    backend, recipe = _serve_up(fake, vm, store, health={**FAST_HEALTH, "readiness_timeout": 1})
    fake.update_outcome = "rolling"
    changed = recipe.model_copy(update={"model": recipe.model.model_copy(update={"max_model_len": 4096})})
    backend.apply(store.load(recipe.name), changed, None, store, Phases())
    assert store.load(recipe.name).recipe != changed.to_yaml_config()  # not recorded while it rolls out
    assert _keys_cli("add", recipe.name).exit_code == 0
    update = [c for c in fake.calls if c.method == "serve_update"][-1]
    assert "4096" in str(update.args["task_config"]["run"]) or "4096" in str(update.args["task_config"])
    assert _keys_cli("revoke", recipe.name, "key-1").exit_code == 0
    assert _keys_cli("add", recipe.name, "--id", "late").exit_code == 0
    listed = _keys_cli("list", recipe.name).output
    assert "key-1" in listed and "revoke pending" in listed
    last = [c for c in fake.calls if c.method == "serve_update"][-1]
    fake.finish_rollout(store.load(recipe.name).details["service"], last.args["secrets"])
    assert "key-1" not in _keys_cli("list", recipe.name).output
    assert store.load(recipe.name).recipe == changed.to_yaml_config()  # recorded once it served alone
