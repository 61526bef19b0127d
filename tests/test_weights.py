"""Weights from a bucket, for real: `mistral-deploy cache` fetches the tiny model from a Hugging Face Hub
stand-in (the Hub's API and downloads, to one token) at one exact commit and uploads it to a local S3
server (moto's, on loopback); `up --cloud local` then runs the real vLLM engine with `model.source`,
which streams the weights from that S3 server with vLLM's Run:ai model streamer, with the Hub stopped
and no Hugging Face token anywhere; the official client talks to it through the real gateway.

The rest is checked without an engine: what a bucket source renders for a VM, and one-line refusals.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml
from openai import OpenAI

from conftest import ENGINE_PYTHON
from hub_standin import COMMIT, HubStandIn
from local_support import cli, cli_env, down_and_assert_gone, free_port, read_deployed
from s3_server import moto_s3, s3_client
from mistral_deploy import engine
from mistral_deploy.recipe import Overrides, load_recipe, validate_recipe_data
from mistral_deploy.render import render_run, render_task

REPO = "mistral-deploy-test/tiny-mistral"
BUCKET = "weights"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's S3 server on loopback, with one bucket."""
    with moto_s3("127.0.0.1", tmp_path_factory.mktemp("moto") / "moto.log") as env:
        client(env).create_bucket(Bucket=BUCKET)
        yield env


client = s3_client


def _recipe(path: Path, port: int) -> Path:
    data = load_recipe("tiny-mistral", Overrides(cloud="local")).recipe.to_yaml_config()
    data["name"] = "streamed"
    data["model"]["id"] = REPO
    data["model"]["hf_token"] = True  # gated on the (stand-in) Hub: `cache` needs the token, the engine not
    data["network"] = {"mode": "private", "port": port}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.engine
def test_cache_then_stream_the_weights_from_the_bucket_with_no_hub_and_no_token(
        s3: dict[str, str], models_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**cli_env(home, models_dir), **s3}
    token = "hf_" + os.urandom(12).hex()
    hub = HubStandIn("127.0.0.1", REPO, engine.ensure_builtin_model("tiny-mistral", ENGINE_PYTHON), token)
    recipe = _recipe(tmp_path / "r.yaml", free_port())
    cached_recipe = tmp_path / "cached.yaml"
    try:
        done = cli("cache", str(recipe), "--to", f"s3://{BUCKET}/tiny-mistral", "--recipe-out", str(cached_recipe),
                   "--json", env={**env, "HF_ENDPOINT": hub.url, "HF_TOKEN": token})
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        hub.stop()  # from here on there is no Hub at all
    summary = json.loads(done.stdout)
    assert summary["commit"] == COMMIT and summary["source"] == f"s3://{BUCKET}/tiny-mistral"
    assert sorted(hub.downloaded) == sorted(summary["files"]) and "model.safetensors" in summary["files"]
    keys = sorted(o["Key"] for o in client(s3).list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == sorted(f"tiny-mistral/{name}" for name in [*summary["files"], "mistral-deploy.json"])
    manifest = json.loads(client(s3).get_object(Bucket=BUCKET, Key="tiny-mistral/mistral-deploy.json")["Body"].read())
    assert manifest["repo"] == REPO and manifest["commit"] == COMMIT
    written = yaml.safe_load(cached_recipe.read_text())
    assert written["model"]["source"] == f"s3://{BUCKET}/tiny-mistral" and written["model"]["revision"] == COMMIT
    assert token not in done.stdout + done.stderr + cached_recipe.read_text()

    # the engine streams the weights from the bucket: no Hub, no token in its environment
    env_up = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # a Hub address that answers nothing
    up = cli("up", str(cached_recipe), "--cloud", "local", "--json", env=env_up)
    assert up.returncode == 0, up.stderr[-3000:]
    deployed = read_deployed("streamed", home, env_up)
    try:
        assert json.loads(up.stdout)["model_commit"] == COMMIT
        assert deployed.record["details"]["model_commit"] == COMMIT
        engine_pid = deployed.record["details"]["engine"]["pid"]
        argv = Path(f"/proc/{engine_pid}/cmdline").read_bytes().split(b"\0")
        assert f"s3://{BUCKET}/tiny-mistral".encode() in argv and b"runai_streamer" in argv
        environ = Path(f"/proc/{engine_pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(b"HF_TOKEN=") for e in environ) and b"HF_HUB_OFFLINE=1" in environ
        log = (deployed.dir / "engine.log").read_text(errors="replace")
        assert "Runai Model Streamer" in log

        reply = OpenAI(base_url=deployed.endpoint, api_key=deployed.key, max_retries=0,
                       http_client=httpx.Client(trust_env=False)).chat.completions.create(
            model="tiny-mistral", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
        assert reply.choices[0].message.content is not None

        # the bucket is filled again with another commit: the deployment keeps what it serves
        other = "f" * 40
        client(s3).put_object(Bucket=BUCKET, Key="tiny-mistral/mistral-deploy.json",
                              Body=json.dumps({**manifest, "commit": other}).encode())
        again = cli("up", str(cached_recipe), "--cloud", "local", env=env_up)
        assert again.returncode == 3, again.stderr
        assert f"model.revision: {COMMIT} is not what s3://{BUCKET}/tiny-mistral holds" in again.stderr
        assert again.stderr.count("\n") <= 3 and "Traceback" not in again.stderr
        unpinned = yaml.safe_load(cached_recipe.read_text())
        del unpinned["model"]["revision"]
        (tmp_path / "unpinned.yaml").write_text(yaml.safe_dump(unpinned))
        moved = cli("up", str(tmp_path / "unpinned.yaml"), "--cloud", "local", env=env_up)
        assert moved.returncode == 3 and f"now holds {other}, and this deployment serves {COMMIT}" in moved.stderr
    finally:
        down_and_assert_gone(deployed)


@pytest.mark.engine
def test_filling_a_prefix_again_leaves_nothing_stale_and_store_refusals_are_one_line(
        s3: dict[str, str], models_dir: Path, tmp_path: Path) -> None:
    env = {**cli_env(tmp_path, models_dir), **s3}
    # what an earlier fill left: a shard the new weights do not have, and a manifest naming another commit
    client(s3).put_object(Bucket=BUCKET, Key="again/model-00002-of-00002.safetensors", Body=b"an old shard")
    client(s3).put_object(Bucket=BUCKET, Key="again/mistral-deploy.json", Body=b'{"commit": "' + b"e" * 40 + b'"}')
    done = cli("cache", "tiny-mistral", "--to", f"s3://{BUCKET}/again", "--json", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    files = json.loads(done.stdout)["files"]
    keys = sorted(o["Key"] for o in client(s3).list_objects_v2(Bucket=BUCKET, Prefix="again/")["Contents"])
    assert keys == sorted(f"again/{name}" for name in [*files, "mistral-deploy.json"])
    manifest = json.loads(client(s3).get_object(Bucket=BUCKET, Key="again/mistral-deploy.json")["Body"].read())
    assert manifest["repo"] == "builtin:tiny-mistral" and manifest["commit"] is None  # built here: no commit

    missing = cli("cache", "tiny-mistral", "--to", "s3://no-such-bucket/x", env=env)
    assert missing.returncode == 9 and "--to: s3://no-such-bucket/x: NoSuchBucket" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) <= 2


def test_a_bucket_source_renders_the_streamer_and_no_hub_download() -> None:
    data = load_recipe("mistral-7b-instruct", Overrides(cloud="aws", gpu="A10G")).recipe.to_yaml_config()
    data["model"].update(source="s3://my-weights/mistral-7b-instruct/", revision="0" * 40)
    recipe = validate_recipe_data(data, "test").recipe
    assert recipe.model.source == "s3://my-weights/mistral-7b-instruct" and not recipe.model.needs_hf_token
    run = render_run(recipe)
    assert "vllm-serve s3://my-weights/mistral-7b-instruct " in run and "--load-format runai_streamer" in run
    # the recipe's Mistral-format flags name the Hub's other layout; the tokenizer mode stays
    assert "--load-format mistral" not in run and "--config-format" not in run and "--tokenizer-mode mistral" in run
    assert "--revision" not in run and "md-download" not in run.split("remove_containers()")[1].split("\n", 1)[1]
    assert "HF_TOKEN" not in run and "--env HF_HUB_OFFLINE=1" in run
    assert '-v "$MD_DIR/vllm-cache:/root/.cache/vllm"' in run  # torch.compile's cache kept on the VM's disk
    task = render_task(recipe)
    assert "HF_TOKEN" not in json.dumps(task.get("secrets") or {})


@pytest.mark.parametrize(("source", "field"), [("http://bucket/x", "model.source"), ("s3://", "model.source"),
                                               ("s3://Bad_Bucket/x", "model.source")])
def test_a_bad_source_is_refused_by_name(source: str, field: str) -> None:
    data = load_recipe("tiny-mistral").recipe.to_yaml_config()
    data["model"]["source"] = source
    with pytest.raises(Exception, match=field.replace(".", r"\.")):
        validate_recipe_data(data, "test")


def test_cache_refuses_a_store_it_cannot_fill_in_one_line(tmp_path: Path, models_dir: Path) -> None:
    env = cli_env(tmp_path, models_dir)
    done = cli("cache", "tiny-mistral", "--to", "gs://my-weights/tiny", env=env)
    assert done.returncode == 3 and "--to: gs://my-weights/tiny: `cache` uploads to s3://" in done.stderr
    assert "Traceback" not in done.stderr
    bad = cli("cache", "tiny-mistral", "--to", "https://example.com/x", env=env)
    assert bad.returncode == 3 and "--to: expected s3://BUCKET/PREFIX" in bad.stderr


# A `docker` that records each call (one argument a line, calls separated by a blank line) and answers what
# the run script asks: the engine's and the gateway's `run -d`, a file limit, and then that the engine exited,
# which ends the script's supervision at once.
_RECORDING_DOCKER = """#!/bin/bash
{ printf '%s\\n' "$@"; echo; } >> "$DOCKER_CALLS"
case "$1 $2" in
  "run --rm") echo 1048576 ;;
  "inspect -f") echo "exited 1" ;;
esac
exit 0
"""


def engine_run_args(tmp_path: Path, recipe, **env: str) -> list[str]:
    """The arguments the rendered run script gives `docker run` for the engine, on a VM whose environment
    holds `env` (as SkyPilot exports SKYPILOT_CLUSTER_INFO), against a recording docker."""
    import subprocess

    from mistral_deploy.gateway import hashes_for, hashes_secret
    from mistral_deploy.render import KEY_HASHES_SECRET

    home, bin_dir = tmp_path / "vm", tmp_path / "bin"
    (home / ".mistral-deploy" / "gateway").mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(_RECORDING_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    calls = tmp_path / "calls"
    vm_env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "DOCKER_CALLS": str(calls),
              KEY_HASHES_SECRET: hashes_secret(hashes_for(["md-recorded-key-0123456789abcdefghijklmnop"])), **env}
    done = subprocess.run(["bash", "-c", render_run(recipe)], env=vm_env, capture_output=True, text=True,
                          timeout=60)
    assert "the engine container stopped" in done.stderr, done.stderr[-2000:]
    runs = [call.splitlines() for call in calls.read_text().split("\n\n") if call.startswith("run\n-d\n--name\nmd-engine")]
    assert len(runs) == 1, calls.read_text()
    return runs[0][:runs[0].index("--entrypoint")]  # docker's own options, before the image's


def _bucket_recipe(source: str, cloud: str, **engine_env: str):
    data = load_recipe("tiny-mistral", Overrides(cloud=cloud, gpu="A10G")).recipe.to_yaml_config()
    data["model"]["source"] = source
    if engine_env:
        data["engine"] = {"env": engine_env}
    return validate_recipe_data(data, "test").recipe


def _cluster_info(cloud: str, region: str) -> str:
    # as SkyPilot 0.14 exports it to the task (cloud_vm_ray_backend._skypilot_predefined_env_vars)
    return json.dumps({"cluster_name": "md-test", "cloud": cloud, "region": region, "zone": None})


def test_an_s3_bucket_on_aws_is_read_from_the_vms_network_with_the_region(tmp_path: Path) -> None:
    """SkyPilot's AWS instances answer IMDSv2 with a hop limit of 1, which Docker's bridge is one hop past:
    an s3:// source on AWS starts the engine on the VM's network, with the region the VM is in; anywhere
    else, and for every other model, the engine stays on the bridge."""
    on_aws = engine_run_args(tmp_path / "a", _bucket_recipe("s3://weights/tiny", "aws"),
                             SKYPILOT_CLUSTER_INFO=_cluster_info("AWS", "eu-west-1"))
    assert on_aws[on_aws.index("--network") + 1] == "host"
    assert {"AWS_REGION=eu-west-1", "AWS_DEFAULT_REGION=eu-west-1", "GLOO_SOCKET_IFNAME=lo",
            "NCCL_SOCKET_IFNAME=lo"} <= {on_aws[i + 1] for i, a in enumerate(on_aws) if a == "--env"}
    assert "-p" not in on_aws and "--publish" not in on_aws  # still no port: the socket alone
    # without SkyPilot's word on the cloud, an aws-only recipe's own region
    data = _bucket_recipe("s3://weights/tiny", "aws").to_yaml_config()
    data["resources"]["region"] = "us-east-2"
    told = engine_run_args(tmp_path / "b", validate_recipe_data(data, "test").recipe)
    assert "--network" in told and "AWS_REGION=us-east-2" in told
    # the recipe's own region setting wins over ours
    own = engine_run_args(tmp_path / "c", _bucket_recipe("s3://weights/tiny", "aws", AWS_REGION="ap-south-1"),
                          SKYPILOT_CLUSTER_INFO=_cluster_info("AWS", "eu-west-1"))
    assert "--network" in own and not any(a.startswith("AWS_REGION=") for a in own)
    # a recipe of several clouds that landed on GCP; weights from GCS or the Hub: the bridge
    for case, recipe, info in (("d", _bucket_recipe("s3://weights/tiny", "aws,gcp"), _cluster_info("GCP", "us-central1")),
                               ("e", _bucket_recipe("gs://weights/tiny", "gcp"), _cluster_info("GCP", "us-central1")),
                               ("f", load_recipe("tiny-mistral", Overrides(cloud="aws", gpu="A10G")).recipe,
                                _cluster_info("AWS", "us-east-1"))):
        args = engine_run_args(tmp_path / case, recipe, SKYPILOT_CLUSTER_INFO=info)
        assert "--network" not in args and not any(a.startswith("AWS_REGION") for a in args), case


def _azure_recipe(**engine_env: str):
    data = load_recipe("tiny-mistral", Overrides(cloud="azure", gpu="A10")).recipe.to_yaml_config()
    data["model"]["source"] = "az://weights/tiny"
    data["engine"] = {"env": engine_env}
    return data


def test_an_azure_container_is_named_with_its_account_and_never_its_key() -> None:
    """az://CONTAINER/PREFIX names no storage account: the Run:ai streamer reads it from
    AZURE_STORAGE_ACCOUNT_NAME (runai_model_streamer_azure), which the recipe's engine.env passes to the
    engine; an account key, or a connection string that holds one, is a secret and never in a recipe."""
    with pytest.raises(Exception, match=r"model\.source: az://weights/tiny names a container, not its storage "
                                        r"account.*engine: \{env: \{AZURE_STORAGE_ACCOUNT_NAME: myaccount\}\}"):
        validate_recipe_data(_azure_recipe(), "test")
    for secret in ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING"):
        with pytest.raises(Exception, match=rf"engine\.env: {secret} looks like a secret"):
            validate_recipe_data(_azure_recipe(AZURE_STORAGE_ACCOUNT_NAME="acct", **{secret: "x"}), "test")
    recipe = validate_recipe_data(_azure_recipe(AZURE_STORAGE_ACCOUNT_NAME="acct"), "test").recipe
    task = render_task(recipe)
    assert task["envs"]["AZURE_STORAGE_ACCOUNT_NAME"] == "acct" and "--env AZURE_STORAGE_ACCOUNT_NAME" in task["run"]


def test_an_azure_source_needs_the_identity_skypilot_gives_the_vm(tmp_path: Path, models_dir: Path) -> None:
    """SkyPilot's own Azure identity (Contributor on the cluster's resource group) reads no blob: `up` refuses
    an az:// source in one line, before anything exists, unless SkyPilot's azure.remote_identity names one,
    read from SkyPilot's config as SkyPilot reads it."""
    path = tmp_path / "az.yaml"
    path.write_text(yaml.safe_dump(_azure_recipe(AZURE_STORAGE_ACCOUNT_NAME="acct") | {"name": "azstream"}))
    env = cli_env(tmp_path, models_dir)
    done = cli("up", str(path), env=env, timeout=120)
    assert done.returncode == 9, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error == ["error: model.source: az://weights/tiny needs an Azure managed identity that can read the "
                     "storage account (Storage Blob Data Reader), and SkyPilot's azure.remote_identity is not set "
                     "(its own identity cannot read blobs); set in ~/.sky/config.yaml: azure: {remote_identity: "
                     "/subscriptions/SUB/resourceGroups/RG/providers/Microsoft.ManagedIdentity/"
                     "userAssignedIdentities/NAME}"], done.stderr
    assert not (Path(env["MISTRAL_DEPLOY_HOME"]) / "deployments" / "azstream").exists()  # nothing recorded

    from sky import skypilot_config

    from mistral_deploy.errors import CloudError
    from mistral_deploy.infra import check_bucket_identity

    recipe = validate_recipe_data(yaml.safe_load(path.read_text()), "test").recipe
    config = Path(os.environ["HOME"]) / ".sky" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    identity = "/subscriptions/0000/resourceGroups/weights/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader"
    try:
        for setting, named in (({"remote_identity": "LOCAL_CREDENTIALS"}, False),
                               ({"remote_identity": identity}, True),
                               ({"remote_identity": [{"md-azstream": identity}, {"*": "LOCAL_CREDENTIALS"}]}, True),
                               ({"remote_identity": [{"md-other": identity}]}, False)):
            config.write_text(yaml.safe_dump({"azure": setting}))
            skypilot_config.reload_config()
            if named:
                check_bucket_identity(recipe)
            else:
                with pytest.raises(CloudError, match="azure.remote_identity is (LOCAL_CREDENTIALS|not set)"):
                    check_bucket_identity(recipe)
        # an az:// source on a VM that is not Azure's has no managed identity at all
        data = yaml.safe_load(path.read_text())
        data["resources"]["cloud"] = "aws"
        data["resources"]["gpu"] = "A10G"
        with pytest.raises(CloudError, match=r"az://weights/tiny is read with an Azure VM's managed identity, and "
                                             r"aws is not Azure"):
            check_bucket_identity(validate_recipe_data(data, "test").recipe)
    finally:
        config.unlink()
        skypilot_config.reload_config()
