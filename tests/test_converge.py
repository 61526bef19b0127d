"""`up` on an existing deployment: the diff (pure), and how each change is applied on a cloud, with
SkyPilot's SDK stood in for (tests/cloud_support.py: what only a cloud account can answer). The same
changes run for real on the local stack (test_converge_local.py) and on the Slurm test bed
(test_cloud_bed.py::test_changes_apply_in_place_on_the_running_cluster).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from _catalog import sky_session  # noqa: F401  (fixture)
from _cli import run_cli
from cloud_support import HF, FakeSky, VmEndpoint, fake, vm  # noqa: F401  (fixtures)
from mistral_deploy.converge import diff, flatten
from mistral_deploy.errors import RecipeError
from mistral_deploy.gateway import key_hash
from mistral_deploy.recipe import Overrides, Recipe, load_recipe, validate_recipe_data
from mistral_deploy.render import HF_TOKEN_SECRET, KEY_HASHES_SECRET
from mistral_deploy.state import StateStore

FAST_HEALTH = {"readiness_timeout": 30, "probe_interval": 0.05, "probe_timeout": 5}


def _recipe(ref: str = "mistral-7b-instruct", **sections: Any) -> Recipe:
    data = load_recipe(ref, Overrides(cloud="aws", gpu="A10G")).recipe.to_yaml_config()
    data["health"] = dict(FAST_HEALTH)
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return validate_recipe_data(data, "test").recipe


# --------------------------------------------------------------------------------------------------
# the diff


def test_flatten_keeps_lists_and_the_engine_environment_whole() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "engine": {"env": {"X": "1"}}, "d": {}}) == {
        "a.b": 1, "a.c": [1, 2], "engine.env": {"X": "1"}, "d": {}}


def test_the_same_recipe_and_defaults_spelled_out_are_no_change() -> None:
    recorded = _recipe()
    spelled = _recipe(limits={"requests_per_minute": 1200}, network={"port": 8443})
    assert diff(recorded, recorded, "cloud").changes == []
    assert diff(recorded, spelled, "cloud").changes == [] and diff(recorded, spelled, "cloud").effect is None


@pytest.mark.parametrize(("sections", "field", "effect"), [
    ({"limits": {"requests_per_minute": 60}}, "limits.requests_per_minute", "gateway-reload"),
    ({"network": {"allow": ["10.0.0.0/8"]}}, "network.allow", "gateway-reload"),
    ({"auth": {"enabled": False}, "network": {"mode": "private"}}, "auth.enabled", "gateway-reload"),
    ({"guardrail": "mistral"}, "guardrail", "gateway-reload"),
    ({"limits": {"max_tokens": 100}}, "limits.max_tokens", "engine-restart"),
    ({"model": {"max_model_len": 4096}}, "model.max_model_len", "engine-restart"),
    ({"engine": {"env": {"VLLM_LOGGING_LEVEL": "DEBUG"}}}, "engine.env", "engine-restart"),
    ({"lifetime": {"ttl": "2h"}}, "lifetime.ttl", "ttl"),
    ({"health": {"probe_interval": 2}}, "health.probe_interval", "record"),
    ({"resources": {"gpu": "L4"}}, "resources.gpu", "new-cluster"),
    ({"resources": {"region": "eu-west-1"}}, "resources.region", "new-cluster"),
    ({"network": {"port": 9443}}, "network.port", "new-cluster"),
])
def test_each_change_costs_what_it_must_on_a_vm(sections, field, effect) -> None:
    plan = diff(_recipe(), _recipe(**sections), "cloud")
    assert (field, effect) in [(c.field, c.effect) for c in plan.changes]
    assert plan.effect == max((c.effect for c in plan.changes), key=["record", "ttl", "gateway-reload",
                                                                      "gateway-restart", "engine-restart",
                                                                      "new-cluster", "service-update"].index)


def test_a_guardrail_is_an_engine_restart_where_the_engine_gets_our_chat_template() -> None:
    """Mistral's tokenizer keeps the system message itself: a gateway reload; a Hugging Face template
    (the AWQ recipe) is replaced by ours with the guardrail: the engine restarts."""
    for ref, effect in (("mistral-7b-instruct", "gateway-reload"), ("mistral-7b-instruct-awq", "engine-restart")):
        plan = diff(_recipe(ref), _recipe(ref, guardrail="mistral"), "cloud")
        assert [(c.field, c.effect) for c in plan.changes] == [("guardrail", effect)], ref


def test_locally_the_listener_is_the_gateways_and_gpus_do_not_matter() -> None:
    local = load_recipe("tiny-mistral", Overrides(cloud="local")).recipe
    port = diff(local, load_recipe("tiny-mistral", Overrides(cloud="local", port=9999)).recipe, "local")
    assert [(c.field, c.before, c.after, c.effect) for c in port.changes] == [
        ("network.port", local.network.port, 9999, "gateway-restart")]
    gpu = diff(local, load_recipe("tiny-mistral", Overrides(cloud="local", gpu="A100")).recipe, "local")
    assert gpu.effect == "record"


def test_a_service_changes_through_sky_serve_update() -> None:
    service = _recipe(replicas={"min": 2}, network={"allow": ["0.0.0.0/0", "::/0"]})
    plan = diff(service, _recipe(replicas={"min": 2}, network={"allow": ["0.0.0.0/0", "::/0"]},
                                 model={"max_model_len": 4096}), "serve")
    assert plan.effect == "service-update"


def test_moving_between_this_machine_and_a_cloud_or_to_a_service_is_refused_by_name() -> None:
    local = load_recipe("tiny-mistral", Overrides(cloud="local")).recipe
    cloud = load_recipe("tiny-mistral", Overrides(cloud="aws", gpu="A10G")).recipe
    with pytest.raises(RecipeError, match=r"resources\.cloud: .* new deployment"):
        diff(local, cloud, "local")
    with pytest.raises(RecipeError, match=r"replicas: .* one VM"):
        diff(_recipe(), _recipe(replicas={"min": 1}), "cloud")


def test_the_plan_reads_as_a_diff_and_as_data() -> None:
    plan = diff(_recipe(), _recipe(limits={"requests_per_minute": 60}, model={"max_model_len": 4096}), "cloud")
    plan.price_before = plan.price_after = 1.006
    lines = plan.lines()
    assert lines[0] == "mistral-7b-instruct: 2 changes"
    assert "limits.requests_per_minute  1200 -> 60 " in lines[1] and lines[1].endswith("[gateway-reload]")
    assert lines[-2].startswith("apply: engine restart on the same machine")
    assert lines[-1] == "price: $1.01/hour -> $1.01/hour"
    data = plan.to_json()
    assert data["effect"] == "engine-restart" and data["changed"] is True
    assert {"field": "model.max_model_len", "from": 16384, "to": 4096, "effect": "engine-restart"} in data["changes"]


# --------------------------------------------------------------------------------------------------
# keys on disk


def test_keys_file_holds_ids_and_reads_the_one_key_per_line_format_too(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.dir("d").mkdir(parents=True)
    store.write_keys("d", {"key-1": "md-" + "a" * 30, "ci": "md-" + "b" * 30})
    assert (store.dir("d") / "api_keys").read_text() == f"key-1 md-{'a' * 30}\nci md-{'b' * 30}\n"
    assert stat.S_IMODE((store.dir("d") / "api_keys").stat().st_mode) == 0o600
    assert store.read_keys("d") == {"key-1": "md-" + "a" * 30, "ci": "md-" + "b" * 30}
    (store.dir("d") / "api_keys").write_text(f"md-{'c' * 30}\nmd-{'d' * 30}\n")  # an earlier version's file
    assert store.read_keys("d") == {"key-1": "md-" + "c" * 30, "key-2": "md-" + "d" * 30}


# --------------------------------------------------------------------------------------------------
# on a cloud, through the CLI


@pytest.fixture
def cloud(fake: FakeSky, vm: VmEndpoint, tmp_path: Path) -> FakeSky:
    """The SDK stood in for, its VM's gateway serving TLS (made the way setup.sh makes it)."""
    vm.start(tls_dir=tmp_path / "tls")
    return fake


def _write(tmp_path: Path, recipe: Recipe) -> str:
    path = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe.to_yaml_config()))
    return str(path)


def _up(path: str, *args: str) -> dict[str, Any]:
    os.environ[HF_TOKEN_SECRET] = HF  # as each shell command has it (`up` takes it out of its own process)
    result = run_cli("up", path, "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _methods(cloud: FakeSky) -> list[str]:
    return [c.method for c in cloud.calls if c.method not in ("cluster", "job_finished", "tail_job",
                                                             "offered_gpus", "hourly_price", "open_tunnel")]


def test_cloud_changes_are_applied_the_cheapest_way(cloud: FakeSky, tmp_path: Path) -> None:
    first = _up(_write(tmp_path, _recipe()))
    endpoint = first["endpoint"]
    store = StateStore()
    key = store.read_api_keys("mistral-7b-instruct")[0]
    cloud.calls.clear()

    # the same recipe: a status check, nothing else
    same = _up(_write(tmp_path, _recipe()))
    assert same["unchanged"] is True and _methods(cloud) == []

    # a gateway change: the new configuration over SSH, nothing launched
    gateway = _up(_write(tmp_path, _recipe(limits={"requests_per_minute": 60})))
    assert gateway["plan"]["effect"] == "gateway-reload" and _methods(cloud) == ["run_on_head"]
    script = cloud.calls[-1].args["script"] if cloud.calls[-1].method == "run_on_head" else next(
        c.args["script"] for c in cloud.calls if c.method == "run_on_head")
    assert "rate=60r/m" in script and key not in script
    cloud.calls.clear()

    # an engine change: the job cancelled and the new task launched on the same cluster, same keys
    engine = _up(_write(tmp_path, _recipe(limits={"requests_per_minute": 60}, model={"max_model_len": 4096})))
    assert engine["plan"]["effect"] == "engine-restart" and engine["endpoint"] == endpoint
    # (a gated model: the token goes over SSH again; the certificate is read and is the same)
    assert _methods(cloud) == ["cancel_job", "launch", "write_head_file", "read_head_file", "endpoint"]
    launch = next(c for c in cloud.calls if c.method == "launch")
    assert launch.args["cluster_name"] == "md-mistral-7b-instruct"
    assert launch.args["secrets"][KEY_HASHES_SECRET] == f"key-1:{key_hash(key)}"
    assert "--max-model-len 4096" in launch.args["task_config"]["run"]
    record = store.load("mistral-7b-instruct")
    assert record.details["job_id"] == 2 and record.phase == "ready"
    assert record.recipe["model"]["max_model_len"] == 4096
    cloud.calls.clear()

    # another GPU: a new cluster, ready before the switch, then the old one removed
    moved = _up(_write(tmp_path, _recipe(limits={"requests_per_minute": 60}, model={"max_model_len": 4096},
                                         resources={"gpu": "L4"})))
    assert moved["plan"]["effect"] == "new-cluster"
    launches = [c for c in cloud.calls if c.method == "launch"]
    assert [c.args["cluster_name"] for c in launches] == ["md-mistral-7b-instruct-2"]
    assert launches[0].args["secrets"][KEY_HASHES_SECRET] == f"key-1:{key_hash(key)}"
    downs = [c.args["cluster_name"] for c in cloud.calls if c.method == "down"]
    assert downs == ["md-mistral-7b-instruct"]
    assert _methods(cloud).index("launch") < _methods(cloud).index("down")
    record = store.load("mistral-7b-instruct")
    assert record.details["cluster"] == "md-mistral-7b-instruct-2" and "next_cluster" not in record.details
    assert Path(record.tls_ca).read_text() == cloud.vm.cert_pem and record.tls_ca == first["tls_ca"]
    assert run_cli("down", "mistral-7b-instruct").exit_code == 0
    assert cloud.calls[-1].method == "down" and cloud.calls[-1].args["cluster_name"] == "md-mistral-7b-instruct-2"


def test_a_failed_move_keeps_the_old_cluster_serving(cloud: FakeSky, tmp_path: Path) -> None:
    from sky import exceptions as sx

    _up(_write(tmp_path, _recipe()))

    def refuse() -> None:
        raise sx.ResourcesUnavailableError("Failed to provision all possible launchable resources.")

    cloud.launch_raises = refuse
    os.environ[HF_TOKEN_SECRET] = HF
    result = run_cli("up", _write(tmp_path, _recipe(resources={"gpu": "L4"})))
    assert result.exit_code == 9 and "still serves from md-mistral-7b-instruct, unchanged" in result.stderr
    record = StateStore().load("mistral-7b-instruct")
    assert record.details["cluster"] == "md-mistral-7b-instruct" and record.phase == "ready"
    assert "next_cluster" not in record.details and record.recipe["resources"]["gpu"] == [{"name": "A10G", "count": 1}]
    assert "md-mistral-7b-instruct-2" not in cloud.clusters


def test_a_failed_move_whose_new_cluster_cannot_be_removed_stays_tracked(cloud: FakeSky, tmp_path: Path) -> None:
    """The new cluster of a failed move is removed; where SkyPilot cannot remove it, the record keeps it
    (`next_cluster`) until it is gone: `status` says so and `down` removes it."""
    from sky import exceptions as sx

    _up(_write(tmp_path, _recipe()))
    old, new = "md-mistral-7b-instruct", "md-mistral-7b-instruct-2"

    def refuse() -> None:
        raise sx.ResourcesUnavailableError("Failed to provision all possible launchable resources.")

    cloud.launch_raises = refuse  # after SkyPilot made the cluster (the stand-in records it first)
    cloud.down_fails[new] = "down: the cloud's API timed out"
    os.environ[HF_TOKEN_SECRET] = HF
    result = run_cli("up", _write(tmp_path, _recipe(resources={"gpu": "L4"})))
    assert result.exit_code == 9 and "still serves from md-mistral-7b-instruct, unchanged" in result.stderr
    record = StateStore().load("mistral-7b-instruct")
    assert record.details["cluster"] == old and record.phase == "ready"
    assert new in cloud.clusters and record.details.get("next_cluster") == new
    assert f"{new} could not be removed" in result.stderr and f"sky down {new}" in result.stderr

    status = json.loads(run_cli("status", "mistral-7b-instruct", "--json").stdout)
    assert status["healthy"] is True and status["next_cluster"] == new and new in status["warning"]
    table = run_cli("status")
    assert f"cluster {new}, from a move" in " ".join(table.stderr.split())

    # `down` goes on failing while the cloud cannot remove it: the record stays
    down = run_cli("down", "mistral-7b-instruct")
    assert down.exit_code == 1 and "API timed out" in down.stderr and "Traceback" not in down.stderr
    assert StateStore().load("mistral-7b-instruct").details["next_cluster"] == new
    del cloud.down_fails[new]
    down = run_cli("down", "mistral-7b-instruct")
    assert down.exit_code == 0, down.stderr
    assert StateStore().list() == [] and old not in cloud.clusters and new not in cloud.clusters

    # a move whose new cluster was removed leaves nothing behind, and status says nothing of it
    cloud.launch_raises = None
    _up(_write(tmp_path, _recipe()))
    cloud.launch_raises = refuse
    os.environ[HF_TOKEN_SECRET] = HF
    assert run_cli("up", _write(tmp_path, _recipe(resources={"gpu": "L4"}))).exit_code == 9
    assert "next_cluster" not in StateStore().load("mistral-7b-instruct").details
    assert "warning" not in json.loads(run_cli("status", "mistral-7b-instruct", "--json").stdout)


def test_keys_add_and_revoke_reach_the_vms_gateway(cloud: FakeSky, tmp_path: Path) -> None:
    import httpx

    up = _up(_write(tmp_path, _recipe()))
    added = run_cli("keys", "add", "mistral-7b-instruct", "--json")
    assert added.exit_code == 0, added.stderr
    new = json.loads(added.stdout)
    assert new["id"] == "key-2"
    ca = up["tls_ca"]

    def status(key: str) -> int:
        import ssl

        return httpx.get(f"{up['endpoint']}/models", headers={"Authorization": f"Bearer {key}"},
                         verify=ssl.create_default_context(cafile=ca)).status_code

    assert status(new["key"]) == 200
    script = next(c.args["script"] for c in reversed(cloud.calls) if c.method == "run_on_head")
    assert new["key"] not in script and key_hash(new["key"]) in script
    assert run_cli("keys", "revoke", "mistral-7b-instruct", "key-2").exit_code == 0
    assert status(new["key"]) == 401
    listed = json.loads(run_cli("keys", "list", "mistral-7b-instruct", "--json").stdout)
    assert [k["id"] for k in listed["keys"]] == ["key-1"]
    bad = run_cli("keys", "add", "mistral-7b-instruct", "--id", "Bad Id")
    assert bad.exit_code == 3 and "--id" in bad.stderr and "Traceback" not in bad.stderr


def test_ttl_sets_the_end_from_now_and_status_shows_time_left_and_cost(cloud: FakeSky, tmp_path: Path) -> None:
    up = run_cli("up", _write(tmp_path, _recipe()))
    assert up.exit_code == 0 and "ends:     never: no TTL" in up.stdout
    result = run_cli("ttl", "mistral-7b-instruct", "2h", "--json")
    assert result.exit_code == 0, result.stderr
    assert 7190 <= json.loads(result.stdout)["time_left_seconds"] <= 7200
    assert cloud.calls[-1].method == "autostop" and cloud.calls[-1].args["minutes"] == 120
    status = json.loads(run_cli("status", "mistral-7b-instruct", "--json").stdout)
    assert status["autostop_minutes"] == 120 and 7100 < status["time_left_seconds"] <= 7200
    assert status["cost_so_far"] is not None and status["cost_so_far"] >= 0
    table = run_cli("status").stdout
    assert "ENDS IN" in table and "1h59m" in table or "2h00m" in table
    # the recipe on record carries the new TTL: `up` with a 2h TTL is no change
    assert StateStore().load("mistral-7b-instruct").recipe["lifetime"]["ttl"] == 7200
    assert run_cli("ttl", "mistral-7b-instruct", "none").exit_code == 0
    assert cloud.calls[-1].args["minutes"] is None
    assert run_cli("ttl", "mistral-7b-instruct", "soon").exit_code == 3


def test_an_engine_restart_without_a_ttl_cancels_the_clusters_autodown(cloud: FakeSky, tmp_path: Path) -> None:
    """An engine restart launches the task again on the same cluster. A task without `autostop` leaves the
    cluster's autodown as it was (SkyPilot sets it again: sky/execution.py, as the stand-in does), so
    without a TTL the task says `autostop: false`, which SkyPilot reads as "cancel it"."""
    cluster = "md-mistral-7b-instruct"
    flag = ["--max-num-seqs", "64"]

    def relaunched(asked: Recipe) -> dict[str, Any]:
        cloud.calls.clear()
        assert _up(_write(tmp_path, asked))["plan"]["effect"] == "engine-restart"
        launch = next(c for c in cloud.calls if c.method == "launch")
        assert launch.args["cluster_name"] == cluster and "--max-num-seqs" in launch.args["task_config"]["run"]
        return launch.args["task_config"]["resources"]

    # the TTL removed in the same `up` as a vLLM flag change
    _up(_write(tmp_path, _recipe(lifetime={"ttl": "2h"})))
    assert (cloud.clusters[cluster].autostop_minutes, cloud.clusters[cluster].autodown) == (120, True)
    base = _recipe().model.vllm_args
    resources = relaunched(_recipe(model={"vllm_args": [*base, *flag]}))
    assert (cloud.clusters[cluster].autostop_minutes, cloud.clusters[cluster].autodown) == (-1, False)
    assert resources.get("autostop") is False
    # SkyPilot's own reading of it: autostop explicitly disabled
    task = cloud.tasks[cluster]
    assert [r.autostop_config.enabled for r in task.resources] == [False] * len(task.resources)
    status = json.loads(run_cli("status", "mistral-7b-instruct", "--json").stdout)
    assert status["autostop_minutes"] == -1 and status["time_left_seconds"] is None

    # `ttl NAME none`, then an engine change: the relaunch says so too
    assert run_cli("ttl", "mistral-7b-instruct", "2h").exit_code == 0
    assert run_cli("ttl", "mistral-7b-instruct", "none").exit_code == 0
    resources = relaunched(_recipe(model={"vllm_args": [*base, *flag, "--max-num-batched-tokens", "4096"]}))
    assert resources.get("autostop") is False and cloud.clusters[cluster].autostop_minutes == -1

    # a TTL that stays keeps its end time (the minutes left), as before
    _up(_write(tmp_path, _recipe(lifetime={"ttl": "2h"}, model={"vllm_args": [*base, *flag]})))
    resources = relaunched(_recipe(lifetime={"ttl": "2h"}, model={"vllm_args": [*base, *flag, "--seed", "1"]}))
    assert resources["autostop"]["down"] is True and 118 <= resources["autostop"]["idle_minutes"] <= 120


def test_a_task_that_cancels_autostop_is_valid_for_skypilot() -> None:
    """`autostop: false` as SkyPilot's own Task and Resources read it: autostop disabled, and written back as
    `false` (what the SDK sends to the API server)."""
    import sky

    from mistral_deploy.render import render_task

    fresh = render_task(_recipe())
    assert "autostop" not in fresh["resources"]  # a new cluster has nothing to cancel
    config = render_task(_recipe(), cancel_autostop=True)
    assert config["resources"]["autostop"] is False
    config["secrets"] = {k: "x" for k in config["secrets"]}
    task = sky.Task.from_yaml_config(config)
    for resources in task.resources:
        assert resources.autostop_config is not None and resources.autostop_config.enabled is False
        assert resources.to_yaml_config()["autostop"] is False
    # a TTL wins over the cancel
    ttl = render_task(_recipe(lifetime={"ttl": "1h"}), cancel_autostop=True)
    assert ttl["resources"]["autostop"] == {"idle_minutes": 60, "down": True, "wait_for": "none"}


def test_ttl_of_a_local_deployment_is_refused_by_name(tmp_path: Path) -> None:
    from mistral_deploy.state import Deployment

    recipe = load_recipe("tiny-mistral", Overrides(cloud="local")).recipe
    store = StateStore()
    store.reserve(Deployment(name=recipe.name, backend="local", recipe=recipe.to_yaml_config(), phase="ready"))
    result = run_cli("ttl", recipe.name, "2h")
    assert result.exit_code == 3 and "runs on this machine" in result.stderr


def test_run_on_a_cloud_gets_a_default_ttl_unless_told_none(cloud: FakeSky, tmp_path: Path) -> None:
    path = _write(tmp_path, _recipe())
    result = run_cli("run", path, "--", "true")
    assert result.exit_code == 0, result.stderr
    launch = next(c for c in cloud.calls if c.method == "launch")
    assert launch.args["task_config"]["resources"]["autostop"]["idle_minutes"] == 120
    cloud.calls.clear()
    os.environ[HF_TOKEN_SECRET] = HF
    result = run_cli("run", path, "--ttl", "none", "--", "true")
    assert result.exit_code == 0, result.stderr
    launch = next(c for c in cloud.calls if c.method == "launch")
    assert "autostop" not in launch.args["task_config"]["resources"]


def test_status_says_when_the_serving_job_ended(cloud: FakeSky, tmp_path: Path) -> None:
    _up(_write(tmp_path, _recipe()))
    cloud.vm.ready = False
    cloud.job_ends = True
    status = json.loads(run_cli("status", "mistral-7b-instruct", "--json").stdout)
    assert status["phase"] == "down" and "serving job" in status["error"] and status["healthy"] is False


def test_a_service_update_keeps_its_certificate_and_the_load_balancer(cloud: FakeSky, tmp_path: Path) -> None:
    service = {"replicas": {"min": 1}, "network": {"allow": ["0.0.0.0/0", "::/0"]}}
    up = _up(_write(tmp_path, _recipe(**service)))
    up_service = StateStore().load("mistral-7b-instruct").details["service"]
    ca = Path(up["tls_ca"]).read_bytes()
    cloud.calls.clear()
    changed = _up(_write(tmp_path, _recipe(**service, model={"max_model_len": 4096})))
    assert changed["plan"]["effect"] == "service-update"
    update = next(c for c in cloud.calls if c.method == "serve_update")
    # the service the first `up` made (relaunched as -lb: its controller was new, see cloud.py)
    assert update.args["blue_green"] is False and update.args["service_name"] == up_service
    assert "--max-model-len 4096" in update.args["task_config"]["run"]
    assert Path(up["tls_ca"]).read_bytes() == ca
    assert StateStore().load("mistral-7b-instruct").recipe["model"]["max_model_len"] == 4096
    # the load balancer stays admitted, the same certificate is served
    task = update.args["task_config"]
    assert task["service"]["tls"]["certfile"].endswith("service-tls/cert.pem")
    assert task["envs"]["MISTRAL_DEPLOY_LOAD_BALANCER"] == StateStore().load("mistral-7b-instruct").details["load_balancer"]


def test_services_share_one_controller_counted_once(cloud: FakeSky, tmp_path: Path, sky_session: Any) -> None:
    """Two services on one user's SkyServe controller: each one's price is its replicas'; the controller's VM
    is shown once, apart, as shared by both (SkyPilot's catalog, the seeded fixture)."""
    from mistral_deploy import pricing

    where = {"cloud": "gcp", "gpu": "L4", "region": "us-central1"}
    service = {"replicas": {"min": 1}, "network": {"allow": ["0.0.0.0/0", "::/0"]}, "resources": where}
    from mistral_deploy.recipe import GpuRequest

    replica = pricing.cheapest_first(pricing.find_offers([GpuRequest(name="L4", count=1)], ["gcp"], "us-central1"),
                                     spot=False)[0].price
    controller = pricing.controller_price("gcp", "us-central1")
    assert controller is not None
    dry = json.loads(run_cli("up", _write(tmp_path, _recipe(name="svc-a", **service)), "--dry-run", "--json").stdout)
    assert dry["price_per_hour"]["after"] == pytest.approx(replica, abs=1e-4)  # one L4 VM, not the controller's
    assert dry["serve_controller"]["price_per_hour"] == pytest.approx(controller)
    first = run_cli("up", _write(tmp_path, _recipe(name="svc-a", **service)))
    assert first.exit_code == 0, first.stderr
    assert f"${replica:.2f}/hour for its replicas (the SkyServe controller" in " ".join(first.stderr.split())
    _up(_write(tmp_path, _recipe(name="svc-b", **service)))
    for name in ("svc-a", "svc-b"):
        assert StateStore().load(name).details["hourly_price"] == pytest.approx(replica, abs=1e-4)

    rows = json.loads(run_cli("status", "--json").stdout)["deployments"]
    assert [r["serve_controller"] for r in rows] == [{"price_per_hour": pytest.approx(controller),
                                                      "consolidation_mode": False, "services_recorded": 2,
                                                      "in_service_price": False}] * 2
    assert [r["hourly_price"] for r in rows] == [pytest.approx(replica, abs=1e-4)] * 2
    table = run_cli("status")
    assert " ".join(table.stderr.split()).count("SkyServe controller:") == 1
    assert "(2 services recorded here)" in " ".join(table.stderr.split())
    # a change to one: its price after is its replicas', the controller apart
    plan = json.loads(run_cli("up", _write(tmp_path, _recipe(name="svc-a", model={"max_model_len": 4096}, **service)),
                              "--dry-run", "--json").stdout)
    assert plan["price_per_hour"]["after"] == pytest.approx(replica, abs=1e-4)
    assert plan["serve_controller"]["services_recorded"] == 2


def test_up_launches_a_vanished_cluster_again_with_the_same_keys(cloud: FakeSky, tmp_path: Path) -> None:
    commit = "3ad372fc79158a2148299e3318516c786aeded6c"
    cloud.job_lines = [f"mistral-deploy: downloaded mistralai/Mistral-7B-Instruct-v0.3 at {commit} (x) to y",
                       *cloud.job_lines]
    path = _write(tmp_path, _recipe())
    _up(path)
    key = StateStore().read_api_keys("mistral-7b-instruct")[0]
    cloud.clusters.clear()  # its TTL, `sky down` or the cloud removed it
    status = json.loads(run_cli("status", "mistral-7b-instruct", "--json").stdout)
    assert status["phase"] == "gone"
    cloud.calls.clear()
    again = _up(path)
    assert again["recreated"] is True and again["phase"] == "ready"
    launches = [c for c in cloud.calls if c.method == "launch"]
    assert [c.args["cluster_name"] for c in launches] == ["md-mistral-7b-instruct"]
    assert f"--revision {commit}" in launches[0].args["task_config"]["run"]  # the weights it served before
    assert StateStore().read_api_keys("mistral-7b-instruct") == [key]
    assert "revision" not in StateStore().load("mistral-7b-instruct").recipe["model"]
    assert json.loads(run_cli("status", "mistral-7b-instruct", "--json").stdout)["healthy"] is True


def test_dry_run_of_a_new_deployment_creates_nothing(cloud: FakeSky, tmp_path: Path) -> None:
    result = run_cli("up", _write(tmp_path, _recipe()), "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["effect"] == "create" and plan["dry_run"] is True
    assert [c.method for c in cloud.calls if c.method in ("launch", "serve_up")] == []
    assert StateStore().list() == []


def test_dry_run_says_when_the_same_recipe_would_repair(cloud: FakeSky, tmp_path: Path) -> None:
    path = _write(tmp_path, _recipe())
    _up(path)
    cloud.vm.ready = False
    cloud.job_ends = True
    result = run_cli("up", path, "--dry-run")
    assert result.exit_code == 0 and "does not answer" in result.stdout and "serving job" in result.stdout
    assert [c.method for c in cloud.calls if c.method == "cancel_job"] == []


def test_a_service_asks_for_blue_green_in_its_recipe(cloud: FakeSky, tmp_path: Path) -> None:
    service = {"network": {"allow": ["0.0.0.0/0", "::/0"]}}
    _up(_write(tmp_path, _recipe(replicas={"min": 1}, **service)))
    plan = json.loads(run_cli("up", _write(tmp_path, _recipe(replicas={"min": 1, "update": "blue-green"}, **service)),
                              "--dry-run", "--json").stdout)
    assert [(c["field"], c["effect"]) for c in plan["changes"]] == [("replicas.update", "record")]
    _up(_write(tmp_path, _recipe(replicas={"min": 2, "update": "blue-green"}, **service)))
    update = next(c for c in cloud.calls if c.method == "serve_update")
    assert update.args["blue_green"] is True


def test_the_hub_commit_of_the_first_download_is_kept_for_every_later_start(cloud: FakeSky, tmp_path: Path) -> None:
    """The download container says which commit it fetched; `up` records it, and an engine restart or a new
    cluster loads that commit again (download and engine pinned to it) until the recipe names another."""
    commit = "3ad372fc79158a2148299e3318516c786aeded6c"
    cloud.job_lines = [f"mistral-deploy: downloaded mistralai/Mistral-7B-Instruct-v0.3 at {commit} "
                       "(consolidated*.safetensors) to /root/.cache/huggingface/hub/x", *cloud.job_lines]
    first = _up(_write(tmp_path, _recipe()))
    store = StateStore()
    assert first["model_commit"] == commit and store.load("mistral-7b-instruct").details["model_commit"] == commit
    first_run = next(c for c in cloud.calls if c.method == "launch").args["task_config"]["run"]
    assert commit not in first_run and "--revision" not in first_run  # the first start: the default branch
    cloud.calls.clear()

    _up(_write(tmp_path, _recipe(model={"max_model_len": 4096})))  # an engine restart
    run = next(c for c in cloud.calls if c.method == "launch").args["task_config"]["run"]
    assert f"mistralai/Mistral-7B-Instruct-v0.3 {commit} 'consolidated*.safetensors'" in run  # the download
    assert f"--revision {commit}" in run  # and the engine, offline, load that commit
    record = store.load("mistral-7b-instruct")
    assert "revision" not in record.recipe["model"]  # the recorded recipe stays what the user wrote
    cloud.calls.clear()

    # the recipe moves to another revision: that one is fetched, and its commit recorded
    other = "0" * 39 + "1"
    cloud.job_lines = [f"mistral-deploy: downloaded mistralai/Mistral-7B-Instruct-v0.3 at {other} (x) to y",
                       *cloud.job_lines[1:]]
    moved = _up(_write(tmp_path, _recipe(model={"max_model_len": 4096, "revision": "v0.3.1"})))
    run = next(c for c in cloud.calls if c.method == "launch").args["task_config"]["run"]
    assert "--revision v0.3.1" in run and commit not in run
    assert moved["model_commit"] == other
