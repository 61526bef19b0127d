"""Weights from an s3:// bucket read with an AWS instance role, on the test bed, as on a SkyPilot AWS VM.

SkyPilot's AWS instances require IMDSv2 (`HttpTokens: required`) and keep EC2's hop limit of 1: the reply
that carries the metadata token is sent with an IP TTL of 1, so a container on Docker's bridge (one routed
hop past the instance) never gets it, and with it no role credentials. Here:

- a "VM": a network namespace of this test's own with a Docker daemon of its own (its bridge routed by the
  VM, as a cloud VM's is), fed by the bed's registry, on which the rendered setup and run scripts run
  unmodified by bash as the bed's node user (`BashVm`), with SKYPILOT_CLUSTER_INFO as SkyPilot exports it;
- its instance metadata service one hop away: another namespace holding 169.254.169.254, a stand-in for
  IMDSv2 (tests/imds_standin.py: tokens by PUT only, the token's reply with an IP TTL of 1, 401 without a
  token) that hands out the role's credentials;
- the bucket: moto's S3 server on the VM's network, filled by `mistral-deploy cache`, that answers only
  requests signed with the role's (STS) credentials once it is filled (anonymous reads refused).

What this shows: the hop limit drops the token for a container on the bridge and not for one on the VM's
network (checked first, with plain containers), and the rendered run script's engine streams the weights
from the bucket with the credentials of that metadata service, serving through the gateway; nothing of the
engine listens on the VM's network, and no credential shows in a log, a container's configuration or a
process's arguments. Not shown: EC2's real metadata service and IAM (moto's STS and IAM stand in), a GPU.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from local_support import assert_gone, cli, cli_env, free_port
from mistral_deploy.gateway import hashes_for, hashes_secret
from mistral_deploy.recipe import validate_recipe_data
from mistral_deploy.render import KEY_HASHES_SECRET, render_task
from testbed import BED, BashVm, Bed, testbed, tiny_recipe_data  # noqa: F401  (fixtures)

pytestmark = pytest.mark.testbed
KEY = "md-bedimds-key-0123456789abcdefghijklmnopqr"
TESTS = Path(__file__).parent
VM_LINK = "10.231.90"  # this machine .1, the VM .2 (the bucket listens there)
VM_BRIDGE = "10.231.91.1/24"  # the VM's Docker bridge
ROLE = "md-weights-reader"
REGION = "us-east-1"
READY_WITHIN = 420.0


@dataclass
class AwsVm:
    """The VM, its metadata service and its bucket, as the test uses them."""

    netns: str
    docker_host: str
    bucket_url: str  # moto, on the VM's network
    credentials: dict[str, str]  # what the role's metadata gives (AccessKeyId, SecretAccessKey, Token)
    imds_log: Path
    moto_log: Path

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command on the VM's network."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True,
                               timeout=timeout)

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", *args], env={**os.environ, "DOCKER_HOST": self.docker_host},
                              capture_output=True, text=True, timeout=timeout)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


def _wait(what: str, ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path,
          timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"{what} did not start: {tail}")
        time.sleep(0.3)


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """A server this test started, by its PID: TERM, then KILL."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _fill_bucket(url: str, tmp_path: Path, models_dir: Path) -> dict[str, str]:
    """`cache` puts the tiny model in s3://weights/tiny; a role that may read it is made, and assumed (its
    STS credentials are what the metadata service hands out); from then on the bucket answers only signed
    requests of known credentials."""
    import boto3
    import httpx
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    setup = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}
    client = {"endpoint_url": url, "region_name": REGION}
    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing", **client).create_bucket(
        Bucket="weights")
    done = cli("cache", "tiny-mistral", "--to", "s3://weights/tiny", env={**cli_env(tmp_path, models_dir), **setup})
    assert done.returncode == 0, done.stderr[-3000:]
    iam = boto3.client("iam", aws_access_key_id="testing", aws_secret_access_key="testing", **client)
    iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))
    # read-only on the bucket (moto names a HEAD s3:HeadObject and a listing s3:ListObjectsV2, which AWS
    # counts as s3:GetObject and s3:ListBucket)
    iam.put_role_policy(RoleName=ROLE, PolicyName="read-weights", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:HeadObject", "s3:List*"],
                                                "Resource": ["arn:aws:s3:::weights", "arn:aws:s3:::weights/*"]}]}))
    sts = boto3.client("sts", aws_access_key_id="testing", aws_secret_access_key="testing", **client)
    assumed = sts.assume_role(RoleArn=f"arn:aws:iam::123456789012:role/{ROLE}", RoleSessionName="i-0123456789abcdef0",
                              DurationSeconds=3600)["Credentials"]
    assert httpx.post(f"{url}/moto-api/reset-auth", content=b"0", trust_env=False).status_code == 200
    role = boto3.client("s3", aws_access_key_id=assumed["AccessKeyId"], aws_secret_access_key=assumed["SecretAccessKey"],
                        aws_session_token=assumed["SessionToken"], **client)
    assert role.get_object(Bucket="weights", Key="tiny/config.json")["Body"].read()
    with pytest.raises(ClientError):  # what a VM without the role's credentials gets
        boto3.client("s3", config=Config(signature_version=UNSIGNED), **client).get_object(
            Bucket="weights", Key="tiny/config.json")
    return {"AccessKeyId": assumed["AccessKeyId"], "SecretAccessKey": assumed["SecretAccessKey"],
            "Token": assumed["SessionToken"], "Expiration": assumed["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ")}


@pytest.fixture
def aws_vm(testbed: Bed, tmp_path: Path, models_dir: Path) -> Iterator[AwsVm]:
    tag = secrets.token_hex(2)
    vm, imds = f"mdi-{tag}-vm", f"mdi-{tag}-md"
    base = Path(f"/tmp/mdi-{tag}")  # short: containerd's socket path under the exec root has a length limit
    base.mkdir(mode=0o755)
    base.chmod(0o755)  # the node user reaches the daemon's socket (group docker) through it
    sock = base / "docker.sock"
    started: list[subprocess.Popen[bytes]] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def spawn(argv: list[str], log: str, **kwargs: object) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, stdout=(logs / log).open("ab"), stderr=subprocess.STDOUT,
                                   start_new_session=True, **kwargs)  # type: ignore[call-overload]
        started.append(process)
        return process

    try:
        # the VM, linked to this machine (the test reaches the bucket through it) and to its metadata service
        _ip("netns", "add", vm)
        _ip("netns", "add", imds)
        _ip("link", "add", f"mdi{tag}h", "type", "veth", "peer", "name", f"mdi{tag}v")
        _ip("link", "set", f"mdi{tag}v", "netns", vm)
        _ip("addr", "add", f"{VM_LINK}.1/24", "dev", f"mdi{tag}h")
        _ip("link", "set", f"mdi{tag}h", "up")
        _ip("-n", vm, "addr", "add", f"{VM_LINK}.2/24", "dev", f"mdi{tag}v")
        _ip("-n", vm, "link", "set", f"mdi{tag}v", "up")
        _ip("-n", vm, "link", "set", "lo", "up")
        _ip("link", "add", f"mdi{tag}a", "type", "veth", "peer", "name", f"mdi{tag}b")
        _ip("link", "set", f"mdi{tag}a", "netns", vm)
        _ip("link", "set", f"mdi{tag}b", "netns", imds)
        _ip("-n", vm, "addr", "add", "169.254.0.1/16", "dev", f"mdi{tag}a")
        _ip("-n", vm, "link", "set", f"mdi{tag}a", "up")
        _ip("-n", imds, "addr", "add", "169.254.169.254/16", "dev", f"mdi{tag}b")
        _ip("-n", imds, "link", "set", f"mdi{tag}b", "up")
        _ip("-n", imds, "link", "set", "lo", "up")
        _ip("-n", imds, "route", "add", "default", "via", "169.254.0.1")
        # a cloud VM routes for its containers: their traffic to the metadata service is forwarded (one hop)
        subprocess.run(["ip", "netns", "exec", vm, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)

        # its Docker daemon (nsenter --net: `ip netns exec` remounts /sys and hides the cgroups dockerd needs),
        # pulling through a registry on its own loopback that serves the bed's images, as the bed's nodes do
        in_vm = ["nsenter", f"--net=/run/netns/{vm}"]
        spawn([*in_vm, "docker-registry", "serve", str(testbed.dir / "registry" / "config.yml")], "registry.log")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        daemon = spawn(
            [*in_vm, "dockerd", "--data-root", str(base / "data"), "--exec-root", str(base / "exec"), "-H",
             f"unix://{sock}", "-G", "docker", "--pidfile", str(base / "dockerd.pid"), "--bip", VM_BRIDGE,
             "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--registry-mirror",
             f"http://{BED['REGISTRY']}", "--insecure-registry", BED["REGISTRY"]], "dockerd.log",
            env={**os.environ, "PATH": f"{testbed.dir / 'bin'}:{os.environ['PATH']}",  # the no-op GPU hook
                 "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1"},
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)))
        docker_host = f"unix://{sock}"
        _wait("the VM's Docker daemon", lambda: subprocess.run(
            ["docker", "info"], env={**os.environ, "DOCKER_HOST": docker_host}, capture_output=True).returncode == 0,
              daemon, logs / "dockerd.log")

        # the bucket, on the VM's network
        port = free_port()
        moto = spawn(["ip", "netns", "exec", vm, str(Path(sys.executable).parent / "moto_server"), "-H",
                      f"{VM_LINK}.2", "-p", str(port)], "moto.log")
        _wait("moto's S3 server", lambda: _connects(f"{VM_LINK}.2", port), moto, logs / "moto.log")
        url = f"http://{VM_LINK}.2:{port}"
        credentials = _fill_bucket(url, tmp_path, models_dir)

        # the metadata service, one hop away; the role's credentials on its standard input
        metadata = spawn(["ip", "netns", "exec", imds, sys.executable, str(TESTS / "imds_standin.py"),
                          str(logs / "imds.log")], "imds.out", stdin=subprocess.PIPE)
        assert metadata.stdin is not None
        metadata.stdin.write(json.dumps({"role": ROLE, "credentials": credentials, "region": REGION}).encode())
        metadata.stdin.close()
        _wait("the metadata service", lambda: "ready" in (logs / "imds.out").read_text(), metadata,
              logs / "imds.out")
        yield AwsVm(vm, docker_host, url, credentials, logs / "imds.log", logs / "moto.log")
    finally:
        boxes = subprocess.run(["docker", "ps", "-aq"], env={**os.environ, "DOCKER_HOST": f"unix://{sock}"},
                               capture_output=True, text=True).stdout.split()
        if boxes:
            subprocess.run(["docker", "rm", "-f", *boxes], env={**os.environ, "DOCKER_HOST": f"unix://{sock}"},
                           capture_output=True)
        for process in reversed(started):
            _stop(process)
        assert_gone([p.pid for p in started], [])
        subprocess.run(["umount", str(base / "exec" / "netns" / "default")], capture_output=True)
        for ns in (vm, imds):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"mdi{tag}h"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
        testbed.clean()


# What a container asks of the metadata service: a token (PUT), then the role's name with it.
_ASK_FOR_A_TOKEN = """
import urllib.request
try:
    ask = urllib.request.Request("http://169.254.169.254/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    token = urllib.request.urlopen(ask, timeout=3).read().decode()
    ask = urllib.request.Request("http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                                 headers={"X-aws-ec2-metadata-token": token})
    print("role", urllib.request.urlopen(ask, timeout=3).read().decode())
except Exception as exc:
    print("no token:", type(exc).__name__)
"""


def _listening_beyond_loopback(pids: list[int]) -> list[str]:
    """The TCP listeners and bound UDP sockets of these processes whose address is not loopback (read in
    their own network namespace)."""
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    loopback = ("0100007F", "00000000000000000000000001000000")  # 127.0.0.1, ::1 as /proc writes them
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pids[0]}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            listening = fields[3] == "0A" if table.startswith("tcp") else True
            if listening and fields[9] in inodes and fields[1].split(":")[0] not in loopback:
                found.append(f"{table} {fields[1]}")
    return found


def _said(vm: BashVm) -> str:
    """What the run script printed: the errors (an engine's root cause comes long before its last lines),
    then the end."""
    errors = [line for line in vm.run_output[:-40] if "Error" in line or "error:" in line.lower()]
    return "\n".join(errors[-20:] + ["..."] + vm.run_output[-40:])


def test_the_engine_streams_s3_weights_with_the_instance_roles_credentials(aws_vm: AwsVm, testbed: Bed) -> None:
    recipe = validate_recipe_data(tiny_recipe_data(
        "aws", "private", model={"source": "s3://weights/tiny"}, resources={"region": REGION},
        # where the bucket is reached from the VM, path-style as moto serves it; no credential of any kind
        engine={"env": {"AWS_ENDPOINT_URL": aws_vm.bucket_url, "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}}),
        "test").recipe
    task = render_task(recipe)
    vm = BashVm(testbed, {KEY_HASHES_SECRET: hashes_secret(hashes_for([KEY]))}, name="imds",
                docker_host=aws_vm.docker_host)
    # as SkyPilot exports them to the job on an AWS cluster: the task's envs, and where the cluster is
    vm.env.update(task["envs"])
    vm.env["SKYPILOT_CLUSTER_INFO"] = json.dumps({"cluster_name": "md-imds", "cloud": "AWS", "region": REGION,
                                                  "zone": f"{REGION}a"})
    try:
        vm.setup(task["setup"], timeout=1200)  # the images, pulled into the VM's daemon

        # the bed's metadata service behaves as EC2's with a hop limit of 1: a container on the VM's network
        # gets a token and the role, one on Docker's bridge gets no answer to its PUT
        image = recipe.engine.image
        asked = {net: aws_vm.docker("run", "--rm", *(["--network", "host"] if net == "host" else []),
                                    "--entrypoint", "python3", image, "-c", _ASK_FOR_A_TOKEN).stdout.strip()
                 for net in ("host", "bridge")}
        assert asked == {"host": f"role {ROLE}", "bridge": "no token: TimeoutError"}, asked

        vm.start(task["run"])
        port = recipe.network.port
        deadline = time.monotonic() + READY_WITHIN
        models = "000"
        while models != "200":
            said = f"{_said(vm)}\n--- the metadata service's log ---\n{aws_vm.imds_log.read_text()[-1500:]}"
            assert vm.run_process is not None and vm.run_process.poll() is None, "the run script ended:\n" + said
            assert time.monotonic() < deadline, "not ready:\n" + said
            time.sleep(2)
            models = aws_vm.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5", "-H",
                                f"Authorization: Bearer {KEY}", f"http://127.0.0.1:{port}/v1/models").stdout
        completion = aws_vm.run(
            "curl", "-s", "-m", "60", "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json",
            "-d", json.dumps({"model": "tiny-mistral", "prompt": "hi", "max_tokens": 2}),
            f"http://127.0.0.1:{port}/v1/completions")
        assert json.loads(completion.stdout)["choices"], completion.stdout

        # the weights came from the bucket, which answers only the role's signed requests, with credentials
        # from the metadata service: a token by PUT (its reply one hop), then the role's credentials with it
        moto_log = aws_vm.moto_log.read_text()
        streamed = re.findall(rf'^{re.escape(VM_LINK)}\.2 .*"GET \S*/weights/tiny/model\.safetensors HTTP/1\.1" (\d+)',
                              moto_log, re.MULTILINE)
        assert streamed and set(streamed) <= {"200", "206"}, moto_log[-3000:]
        imds_log = aws_vm.imds_log.read_text()
        assert "PUT /latest/api/token 200 (no token, ttl 1) from 169.254.0.1" in imds_log, imds_log
        assert f"GET /latest/meta-data/iam/security-credentials/{ROLE} 200 (token) from 169.254.0.1" in imds_log

        engine = json.loads(aws_vm.docker("inspect", "md-engine").stdout)[0]
        assert engine["HostConfig"]["NetworkMode"] == "host"
        assert f"AWS_REGION={REGION}" in engine["Config"]["Env"]
        assert not engine["HostConfig"]["PortBindings"]
        # nothing of the engine listens on the VM's network: its socket alone (its workers' rendezvous on
        # loopback, if any)
        pids = [int(p) for p in aws_vm.docker("top", "md-engine", "-eo", "pid").stdout.split()[1:]]
        assert pids and _listening_beyond_loopback(pids) == []

        # the role's secrets: in no log, container configuration or process argument
        secret_values = [aws_vm.credentials["SecretAccessKey"], aws_vm.credentials["Token"]]
        shown = "\n".join(vm.run_output) + imds_log + moto_log
        shown += aws_vm.docker("inspect", "md-engine", "md-gateway").stdout
        shown += aws_vm.docker("logs", "md-engine").stdout + aws_vm.docker("logs", "md-engine").stderr
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    shown += (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
        assert not [s for s in secret_values if s in shown]

        assert vm.cancel() != 0
        assert aws_vm.docker("ps", "-aq").stdout.split() == []
    finally:
        vm.close()
