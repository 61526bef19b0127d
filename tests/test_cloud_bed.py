"""The cloud path for real, on the test bed (tests/testbed.py): `mistral-deploy up --cloud slurm`.

SkyPilot 0.14.1 provisions a cluster on the bed's Slurm cluster, runs its node runtime, our setup and run
scripts unmodified; they pull the stand-in images from the bed's registry through a real Docker daemon,
start the real vLLM CPU build and the nginx gateway in containers. The CLI runs as a user would run it,
in a subprocess, against SkyPilot's own API server (stopped at the module's end). Nothing here is faked
but the GPU (a Slurm gres with no device behind it) and, in one test, the Hugging Face Hub.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import stat
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from hub_standin import HubStandIn
from local_support import assert_gone, port_free
from testbed import Bed, BedClient, bed_client, testbed, tiny_recipe_data  # noqa: F401  (fixtures)

pytestmark = pytest.mark.testbed
# made per run: the tests search files for it, and this file (or its checkout under /tmp) must not count
HF = "hf_bedtest_" + secrets.token_hex(16)


def write_recipe(path: Path, name: str, **changes: Any) -> Path:
    """The tiny model on the bed's Slurm cluster, private; `changes` by section."""
    data = tiny_recipe_data("slurm", "private", name=name, health={"readiness_timeout": 900, "probe_interval": 1},
                            **changes)
    path.write_text(yaml.safe_dump(data))
    return path


# SkyPilot's own runtime on the node passes the job's environment, secrets included, in the arguments of
# the commands it runs there (`bash --login -c ... srun ...`). How secrets reach the VM is the hardening
# issue's to change; what is ours (the CLI, ssh, docker, the containers) is checked here.
_SKYPILOT_RUNTIME = re.compile(r"\bsrun\b|sky_job_|skypilot-runtime|sky\.skylet")


def secret_in_process_arguments(secret: str, *, anywhere: bool = False) -> list[str]:
    """Processes on this machine, other than SkyPilot's node runtime (unless `anywhere`), whose arguments
    hold the secret."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if secret in argv and (anywhere or not _SKYPILOT_RUNTIME.search(argv)):
                found.append(f"{entry.name}: {argv[:160]}")
    return found


def secret_in_process_environments(secret: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if secret.encode() in (entry / "environ").read_bytes():
                    found.append(entry.name)
            except OSError:
                continue
    return found


def files_holding(secret: str, roots: list[Path]) -> list[Path]:
    """Regular files under `roots` (up to 64 MB each) whose bytes hold the secret, and that are not 0600."""
    needle, found = secret.encode(), []
    for root in roots:
        for path in root.rglob("*"):
            try:
                info = path.lstat()
                if not stat.S_ISREG(info.st_mode) or info.st_size > 64 << 20 or stat.S_IMODE(info.st_mode) == 0o600:
                    continue
                if needle in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


def metric_series(text: str) -> dict[str, float]:
    """Prometheus text as {series: value}."""
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                  if line and not line.startswith("#"))}


def wait_until(what: str, condition, timeout: float, every: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    pytest.fail(f"{what} did not happen within {timeout:.0f}s")


def test_private_endpoint_lifecycle_on_slurm(testbed: Bed, bed_client: BedClient, tmp_path: Path) -> None:
    name = "bedlife"
    recipe = write_recipe(tmp_path / "r.yaml", name)
    port = yaml.safe_load(recipe.read_text())["network"]["port"]
    up = bed_client.cli("up", str(recipe), "--ttl", "2m", "--json")
    assert up.returncode == 0, up.stderr[-4000:]
    summary = json.loads(up.stdout)  # stdout is the JSON alone: SkyPilot's own lines went to stderr
    assert summary["phase"] == "ready" and summary["network"] == "private"
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", summary["endpoint"])
    key = bed_client.key(name)
    record = bed_client.record(name)
    details = record["details"]
    assert details["cloud"] == "slurm" and details["accelerators"]
    # every phase of `up` timed, in order, as `status --json` shows them
    phases = [p["phase"] for p in details["phases"]]
    for expected in ("provisioning", "setup", "image-pull", "engine-start", "weights", "warmup", "first-token"):
        assert expected in phases, phases
    assert phases.index("image-pull") < phases.index("engine-start") < phases.index("weights")

    # what SkyPilot and the bed see: one cluster, one Slurm job, both containers, the engine on loopback
    assert f"md-{name}" in bed_client.clusters()
    assert len(testbed.slurm_jobs()) == 1
    assert sorted(testbed.containers()) == ["md-engine", "md-gateway"]
    assert testbed.docker("port", "md-engine").strip() == ""  # the engine serves on its Unix socket only
    assert not port_free(port, "127.0.0.1")  # the gateway, on the node's loopback only (private mode)

    status = json.loads(bed_client.cli("status", name, "--json").stdout)
    assert status["healthy"] is True and status["cluster_status"] == "UP" and status["autostop_minutes"] == 2
    assert status["phases"] == details["phases"] and details["up_seconds"] > 0
    ip = bed_client.cli("status", "--ip", name)
    assert ip.returncode == 0 and ip.stdout.strip() == "127.0.0.1"
    # a file of the VM over SkyPilot's SSH access, as `up` reads a public endpoint's certificate (with a
    # HOME other than the passwd one, OpenSSH alone would not find SkyPilot's key)
    read = subprocess.run(
        [sys.executable, "-c", "import sys; from mistral_deploy.skysdk import SkySdk; "
         "sys.stdout.write(SkySdk().read_head_file(sys.argv[1], '~/.mistral-deploy/gateway/nginx.conf'))",
         f"md-{name}"], env=bed_client.env, capture_output=True, text=True, timeout=120)
    assert read.returncode == 0 and f"listen 127.0.0.1:{port};" in read.stdout, read.stderr[-2000:]

    # the tunnel SkyPilot's SSH access carries; the official client through it
    tunnel = subprocess.Popen([bed_client.cli_path, "tunnel", name], env=bed_client.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        url = tunnel.stdout.readline().strip()
        assert url == summary["endpoint"], tunnel.stderr.read() if tunnel.poll() is not None else url
        from openai import OpenAI

        client = OpenAI(base_url=url, api_key=key, http_client=httpx.Client(trust_env=False))
        reply = client.chat.completions.create(model="tiny-mistral", max_tokens=4,
                                               messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].message.content is not None
        chunks = list(client.completions.create(model="tiny-mistral", prompt="a", max_tokens=4, stream=True))
        assert len(chunks) >= 2
        base = url.removesuffix("/v1")
        assert httpx.get(f"{url}/models", trust_env=False).status_code == 401
        assert httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"}, trust_env=False
                         ).status_code == 404
        env = bed_client.cli("env", name)
        assert f"OPENAI_BASE_URL={url}" in env.stdout and key in env.stdout

        # what the endpoint did, read on the VM over SkyPilot's SSH access: a request's tokens are counted for
        # its key exactly as the engine counted them (the records are written once a second)
        before = metric_series(bed_client.cli("metrics", name).stdout)
        client.completions.create(model="tiny-mistral", prompt="a", max_tokens=7)
        deadline = time.monotonic() + 20
        while True:
            after = metric_series(bed_client.cli("metrics", name).stdout)
            grew = {n: after.get(n, 0.0) - before.get(n, 0.0) for n in after}
            vllm_grew = sum(v for n, v in grew.items() if n.startswith("vllm:generation_tokens_total{"))
            if grew.get('mistral_deploy_completion_tokens_total{key="key-1"}') == vllm_grew == 7:
                break
            assert time.monotonic() < deadline, grew
            time.sleep(1)
        assert sum(v for n, v in grew.items() if n.startswith("vllm:prompt_tokens_total{")) == \
            grew['mistral_deploy_prompt_tokens_total{key="key-1"}'] > 0
        rows = {r["key"]: r for r in json.loads(bed_client.cli("usage", name, "--json").stdout)["keys"]}
        assert rows["key-1"]["outcomes"]["2xx"] >= 3 and rows["-"]["outcomes"]["401/403"] >= 1
        top = bed_client.cli("top", name, "--once", "--json")
        assert top.returncode == 0, top.stderr[-2000:]
        snapshot = json.loads(top.stdout)
        assert snapshot["total"]["engines_up"] == 1 and snapshot["total"]["ttft"]["count"] >= 3
        assert {r["key"] for r in snapshot["keys"]} >= {"key-1", "-"} and key not in top.stdout
    finally:
        tunnel.send_signal(signal.SIGINT)
        assert tunnel.wait(timeout=30) == 0
    assert_gone([tunnel.pid], [int(url.rsplit(":", 1)[1].split("/")[0])])

    logs = bed_client.cli("logs", name, "-n", "200")
    assert logs.returncode == 0 and "[gateway]" in logs.stdout and "POST /v1/chat/completions" in logs.stdout
    # the key: in no log, no output, no process's arguments
    for text in (logs.stdout, logs.stderr, up.stdout, up.stderr):
        assert key not in text
    assert secret_in_process_arguments(key) == []
    # Only the key's hash left this machine: the key is in no file but the client's 0600 one (not on the
    # node, not in SkyPilot's records, its API server's request database and logs included), in no
    # process's arguments or environment (SkyPilot's node runtime included), in no container's config.
    roots = [testbed.dir / "home", Path("/tmp"), Path(bed_client.env["HOME"]), Path(bed_client.env["SKY_RUNTIME_DIR"]),
             Path(bed_client.env["MISTRAL_DEPLOY_HOME"])]
    assert files_holding(key, roots) == []
    assert secret_in_process_arguments(key, anywhere=True) == []
    assert secret_in_process_environments(key) == []
    assert key not in testbed.docker("inspect", "md-engine", "md-gateway")
    # SkyPilot's Slurm runtime gives each cluster a home of its own under the node user's
    key_map, = (testbed.dir / "home" / ".sky_clusters").glob(f"md-{name}-*/.mistral-deploy/gateway/api_keys.map")
    assert key_map.read_text() == f'"{hashlib.sha256(key.encode()).hexdigest()}" key-1;\n'
    # hashes only, for the gateway's workers too (gateway.js), behind the 0700 state folder
    assert stat.S_IMODE(key_map.stat().st_mode) == 0o644
    assert stat.S_IMODE(key_map.parent.parent.stat().st_mode) == 0o700

    # the TTL: SkyPilot tears the cluster down by itself. (Its autodown on Slurm signals the batch script
    # and the job's steps at once; the allocation can end, killing the run script, before the script's
    # trap has removed the containers. A VM goes with its containers; here bed.clean() removes them. The
    # trap itself is tested where the run script alone is signalled: test_cloud_bed_vm.py, vm.cancel().)
    wait_until("the TTL's autodown", lambda: f"md-{name}" not in bed_client.clusters(), timeout=420, every=10)
    wait_until("the Slurm job's end", lambda: testbed.slurm_jobs() == [], timeout=60, every=2)
    gone = json.loads(bed_client.cli("status", name, "--json").stdout)
    assert gone["phase"] == "gone" and gone["healthy"] is False and gone["cluster_status"] == "missing"
    assert f"mistral-deploy down {name}" in gone["error"]
    down = bed_client.cli("down", name)
    assert down.returncode == 0, down.stderr
    assert bed_client.cli("status", name).returncode == 5
    testbed.clean()


def test_a_gateway_that_cannot_start_fails_the_job_and_up_at_once(testbed: Bed, bed_client: BedClient,
                                                                   tmp_path: Path) -> None:
    name = "bedbusy"
    recipe = write_recipe(tmp_path / "r.yaml", name)
    port = yaml.safe_load(recipe.read_text())["network"]["port"]
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen(1)
    try:
        started = time.monotonic()
        up = bed_client.cli("up", str(recipe))
        waited = time.monotonic() - started
    finally:
        squatter.close()
    assert up.returncode == 8, up.stderr[-3000:]
    error = [line for line in up.stderr.splitlines() if line.startswith("error: ")]
    assert error == ["error: the gateway container stopped (exited, exit code 1); its last lines are above"]
    assert "Address already in use" in up.stderr  # nginx's own line, in the log tail `up` shows
    assert waited < 900 / 2, "up waited for the readiness timeout instead of seeing the job end"
    queue = bed_client.sky("queue", f"md-{name}")
    assert re.search(r"\bFAILED\b", queue.stdout), queue.stdout
    assert bed_client.record(name)["phase"] == "failed"
    assert testbed.docker("inspect", "-f", "{{.State.Running}}", "md-engine").strip() == "false"
    down = bed_client.cli("down", name)
    assert down.returncode == 0, down.stderr
    assert f"md-{name}" not in bed_client.clusters()
    testbed.clean()


GATED = "mistralai/Mistral-7B-v0.1"


@pytest.fixture
def hub(testbed: Bed, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    """The stand-in Hub on the bed's Docker bridge, serving the tiny model as the gated GATED to the token
    HF alone."""
    from conftest import ENGINE_PYTHON
    from mistral_deploy import engine

    monkeypatch.setenv("MISTRAL_DEPLOY_MODELS_DIR", str(models_dir))
    folder = engine.ensure_builtin_model("tiny-mistral", ENGINE_PYTHON)
    bridge = testbed.docker("network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}").strip()
    stand_in = HubStandIn(bridge, GATED, folder, HF)
    yield stand_in
    stand_in.stop()


def gated_recipe(tmp_path: Path, name: str, hub: HubStandIn) -> Path:
    # several clouds in order: SkyPilot has no AWS credentials here, so it fails over to the Slurm cluster
    return write_recipe(tmp_path / "r.yaml", name, model={"id": GATED, "hf_token": True, "max_model_len": 256},
                        resources={"cloud": ["aws", "slurm"]},
                        engine={"env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_ENDPOINT": hub.url}})


def test_a_gated_model_refused_by_the_hub_ends_up_with_that_reason(testbed: Bed, bed_client: BedClient,
                                                                   hub: HubStandIn, tmp_path: Path) -> None:
    name = "bedgated"
    wrong = "hf_bedtest_a_token_without_access_0123"
    up = bed_client.cli("up", str(gated_recipe(tmp_path, name, hub)), env={"HF_TOKEN": wrong})
    assert up.returncode == 8, up.stderr[-3000:]
    assert "the Hugging Face Hub refused the model download (401" in up.stderr
    # the token reached the download (as a SkyPilot secret, then that container's environment) ...
    assert f"Bearer {wrong}" in hub.authorizations and hub.downloaded == []
    # ... and nothing that shows or runs
    logs = bed_client.cli("logs", name, "-n", "500")
    for text in (up.stdout, up.stderr, logs.stdout, logs.stderr):
        assert wrong not in text
    assert secret_in_process_arguments(wrong) == []
    record = bed_client.record(name)
    assert record["details"]["cloud"] == "slurm" and record["phase"] == "failed"
    assert "401" in record["details"]["error"]
    assert bed_client.cli("down", name).returncode == 0
    testbed.clean()


def test_a_gated_model_is_downloaded_with_the_token_and_served_without_it(testbed: Bed, bed_client: BedClient,
                                                                          hub: HubStandIn, tmp_path: Path) -> None:
    """The token is used by a short-lived download container only: the engine runs offline, without it."""
    name = "bedhub"
    up = bed_client.cli("up", str(gated_recipe(tmp_path, name, hub)), env={"HF_TOKEN": HF})
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert "model.safetensors" in hub.downloaded and f"Bearer {HF}" in hub.authorizations
        phases = [p["phase"] for p in bed_client.record(name)["details"]["phases"]]
        assert phases.index("weights-download") < phases.index("engine-start"), phases
        engine = json.loads(testbed.docker("inspect", "md-engine"))[0]
        assert "HF_HUB_OFFLINE=1" in engine["Config"]["Env"]
        assert not any(v.startswith("HF_TOKEN") for v in engine["Config"]["Env"])
        assert HF not in json.dumps(engine) and HF not in testbed.docker("inspect", "md-gateway")
        assert sorted(testbed.containers()) == [
            "md-engine", "md-gateway"]  # the download container is gone
        status = json.loads(bed_client.cli("status", name, "--json").stdout)
        assert status["healthy"] is True
        logs = bed_client.cli("logs", name, "-n", "500")
        assert HF not in logs.stdout + logs.stderr + up.stdout + up.stderr
        # the token went over SSH into a 0600 file the run script deleted after the download: it is in no
        # file (the node's, SkyPilot's records and its API server's database), no process's arguments or
        # environment, not even SkyPilot's runtime's
        roots = [testbed.dir / "home", Path("/tmp"), Path(bed_client.env["HOME"]),
                 Path(bed_client.env["SKY_RUNTIME_DIR"]), Path(bed_client.env["MISTRAL_DEPLOY_HOME"])]
        assert [p for p in roots[0].rglob("hf-token.env*")] == []
        assert files_holding(HF, roots) == []
        assert secret_in_process_arguments(HF, anywhere=True) == []
        assert secret_in_process_environments(HF) == []
    finally:
        assert bed_client.cli("down", name).returncode == 0
        testbed.clean()


def test_weights_stream_from_a_bucket_with_no_hub_and_no_token_on_the_vm(testbed: Bed, bed_client: BedClient,
                                                                         hub: HubStandIn, tmp_path: Path) -> None:
    """`cache` fills a bucket (moto's S3 server, on the bed's Docker bridge as a bucket endpoint inside a VPC
    would be) from the Hub at one commit; on the VM the engine streams the weights from it with the Run:ai
    streamer the image ships: no download container, no token, nothing asked of the Hub."""
    from hub_standin import COMMIT
    from s3_server import moto_s3, s3_client

    name = "bedbucket"
    bridge = hub.url.split("//", 1)[1].rsplit(":", 1)[0]
    with moto_s3(bridge, tmp_path / "moto.log") as s3:
        # the VM reads the bucket without credentials of its own (on AWS: the instance's role); moto serves
        # anonymous reads of public-read objects
        s3_client(s3).create_bucket(Bucket="weights", ACL="public-read")
        # the Slurm cluster alone: the client's environment below holds (moto's) AWS credentials
        recipe = write_recipe(tmp_path / "r.yaml", name, model={"id": GATED, "hf_token": True, "max_model_len": 256},
                              engine={"env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                              # where the bucket is reached from the VM, as for an S3-compatible store
                                              "AWS_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"], "AWS_REGION": "us-east-1",
                                              "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
                                              "RUNAI_STREAMER_S3_UNSIGNED": "1", "AWS_EC2_METADATA_DISABLED": "true"}})
        cached = tmp_path / "cached.yaml"
        done = bed_client.cli("cache", str(recipe), "--to", "s3://weights/tiny", "--recipe-out", str(cached),
                              env={**s3, "HF_ENDPOINT": hub.url, "HF_TOKEN": HF})
        assert done.returncode == 0, done.stderr[-3000:]
        fetched = list(hub.downloaded)
        assert "model.safetensors" in fetched
        for item in s3_client(s3).list_objects_v2(Bucket="weights")["Contents"]:
            s3_client(s3).put_object_acl(Bucket="weights", Key=item["Key"], ACL="public-read")
        up = bed_client.cli("up", str(cached), env=s3)  # no HF_TOKEN: none is needed
        try:
            assert up.returncode == 0, up.stderr[-3000:]
            assert hub.downloaded == fetched  # the VM asked the Hub for nothing
            assert bed_client.record(name)["details"]["model_commit"] == COMMIT
            assert sorted(testbed.containers()) == ["md-engine", "md-gateway"]  # no download container ran
            engine = json.loads(testbed.docker("inspect", "md-engine"))[0]
            args = engine["Args"]
            assert "s3://weights/tiny" in args and args[args.index("--load-format") + 1] == "runai_streamer"
            assert "HF_HUB_OFFLINE=1" in engine["Config"]["Env"]
            assert not any(v.startswith("HF_TOKEN") for v in engine["Config"]["Env"])
            logs = bed_client.cli("logs", name, "-n", "1000")
            assert "Runai Model Streamer" in logs.stdout
            status = json.loads(bed_client.cli("status", name, "--json").stdout)
            assert status["healthy"] is True
        finally:
            assert bed_client.cli("down", name).returncode == 0
            testbed.clean()


def _container_id(testbed: Bed, name: str) -> str:
    return testbed.docker("inspect", "-f", "{{.Id}}", name).strip()


def test_changes_apply_in_place_on_the_running_cluster(testbed: Bed, bed_client: BedClient, tmp_path: Path) -> None:
    """`up` again with a changed recipe: a gateway change is an nginx reload over SSH (the job and both
    containers stay), an engine change replaces the serving job on the same cluster (same address, keys and
    tunnel URL); `keys add/revoke` reach the VM's gateway at once; `ttl` sets the cluster's end anew."""
    name = "bedconv"
    cluster = f"md-{name}"
    data = tiny_recipe_data("slurm", "private", name=name, health={"readiness_timeout": 900, "probe_interval": 1})

    def write(path: Path, **sections: Any) -> Path:  # the same port each time: a new port is a new cluster
        changed = json.loads(json.dumps(data))
        for section, values in sections.items():
            changed.setdefault(section, {}).update(values)
        path.write_text(yaml.safe_dump(changed))
        return path

    first = write(tmp_path / "r1.yaml")
    up = bed_client.cli("up", str(first), "--ttl", "30m", "--json")
    assert up.returncode == 0, up.stderr[-4000:]
    endpoint = json.loads(up.stdout)["endpoint"]
    key = bed_client.key(name)
    job = bed_client.record(name)["details"]["job_id"]
    gateway_box, engine_box = _container_id(testbed, "md-gateway"), _container_id(testbed, "md-engine")

    # the same recipe: nothing is touched
    same = bed_client.cli("up", str(first), "--ttl", "30m", "--json")
    assert same.returncode == 0, same.stderr[-2000:]
    assert json.loads(same.stdout)["unchanged"] is True and bed_client.record(name)["details"]["job_id"] == job

    # the TTL, counted from now
    ttl = bed_client.cli("ttl", name, "7m", "--json")
    assert ttl.returncode == 0, ttl.stderr[-2000:]
    assert 400 <= json.loads(ttl.stdout)["time_left_seconds"] <= 420
    status = json.loads(bed_client.cli("status", name, "--json").stdout)
    assert status["autostop_minutes"] == 7 and status["healthy"] is True and status["time_left_seconds"] <= 420

    tunnel = subprocess.Popen([bed_client.cli_path, "tunnel", name], env=bed_client.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        url = tunnel.stdout.readline().strip()
        assert url == endpoint

        def models(with_key: str) -> int:
            return httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {with_key}"}, trust_env=False,
                             timeout=30).status_code

        # a gateway change: reloaded over SSH, the job and the containers stay
        second = write(tmp_path / "r2.yaml", lifetime={"ttl": "7m"}, limits={"requests_per_minute": 600})
        plan = json.loads(bed_client.cli("up", str(second), "--dry-run", "--json").stdout)
        assert [(c["field"], c["effect"]) for c in plan["changes"]] == [("limits.requests_per_minute", "gateway-reload")]
        applied = bed_client.cli("up", str(second), "--json")
        assert applied.returncode == 0, applied.stderr[-4000:]
        assert bed_client.record(name)["details"]["job_id"] == job
        assert (_container_id(testbed, "md-gateway"), _container_id(testbed, "md-engine")) == (gateway_box, engine_box)
        conf, = (testbed.dir / "home" / ".sky_clusters").glob(f"{cluster}-*/.mistral-deploy/gateway/nginx.conf")
        assert "rate=600r/m" in conf.read_text()
        assert models(key) == 200

        # keys: added and revoked live on the VM's gateway
        added = bed_client.cli("keys", "add", name, "--id", "ci", "--json")
        assert added.returncode == 0, added.stderr[-2000:]
        new_key = json.loads(added.stdout)["key"]
        assert models(new_key) == 200
        key_map, = (testbed.dir / "home" / ".sky_clusters").glob(f"{cluster}-*/.mistral-deploy/gateway/api_keys.map")
        assert key_map.read_text().count(";\n") == 2 and new_key not in key_map.read_text()
        revoked = bed_client.cli("keys", "revoke", name, "ci")
        assert revoked.returncode == 0, revoked.stderr[-2000:]
        assert models(new_key) == 401 and models(key) == 200
        assert key_map.read_text() == f'"{hashlib.sha256(key.encode()).hexdigest()}" key-1;\n'
        assert files_holding(new_key, [testbed.dir / "home", Path(bed_client.env["SKY_RUNTIME_DIR"])]) == []

        # an engine change: the serving job replaced on the same cluster, same URL and key
        third = write(tmp_path / "r3.yaml", lifetime={"ttl": "7m"}, limits={"requests_per_minute": 600},
                             model={"max_model_len": 384})
        applied = bed_client.cli("up", str(third), "--json")
        assert applied.returncode == 0, applied.stderr[-4000:]
        result = json.loads(applied.stdout)
        assert result["plan"]["effect"] == "engine-restart" and result["endpoint"] == endpoint
        details = bed_client.record(name)["details"]
        assert details["job_id"] != job and details["cluster"] == cluster
        assert bed_client.clusters() == [cluster] and len(testbed.slurm_jobs()) == 1
        assert _container_id(testbed, "md-engine") != engine_box
        engine_args = testbed.docker("inspect", "-f", "{{json .Args}}", "md-engine")
        assert "384" in engine_args
        # the tunnel `mistral-deploy tunnel` holds reached the same VM all along
        assert models(key) == 200
        status = json.loads(bed_client.cli("status", name, "--json").stdout)
        assert status["healthy"] is True and status["autostop_minutes"] >= 1
        assert 0 < status["time_left_seconds"] <= 420  # the end time did not move with the engine
    finally:
        tunnel.send_signal(signal.SIGINT)
        tunnel.wait(timeout=30)
    down = bed_client.cli("down", name)
    assert down.returncode == 0, down.stderr
    assert bed_client.clusters() == []
    # `down` on Slurm can end the allocation before the run script's trap has removed the containers (seen in
    # full runs, not alone), as the TTL's autodown can: a VM goes with its containers. The trap is tested in
    # test_cloud_bed_vm.py (vm.cancel()); here the job must end.
    wait_until("the Slurm job's end", lambda: testbed.slurm_jobs() == [], timeout=60, every=2)
    testbed.clean()
