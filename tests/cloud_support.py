"""Stand-ins for what cannot run here: a cloud account behind SkyPilot's SDK, and the VM it would start.

FakeSky replaces mistral_deploy.skysdk.SkySdk, the one module that calls SkyPilot, and nothing else.
It still builds every task with SkyPilot's own `sky.Task.from_yaml_config` (in-process, no API server),
raises SkyPilot's own exception classes through the real error translation, and records each call.

VmEndpoint is the remote VM's gateway as the client sees it: a real HTTP(S) server on 127.0.0.1 that
answers /health and the OpenAI routes, checks `Authorization: Bearer` against the keys that were
passed at launch as SkyPilot secrets, and serves TLS with a certificate made the way setup.sh makes it
(self-signed, CA:TRUE), which `up` fetches and pins. Tests start and stop it (port freed on stop).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from mistral_deploy import skysdk
from mistral_deploy.gateway import key_hash
from mistral_deploy.render import HF_TOKEN_SECRET, KEY_HASHES_SECRET, PROBE_KEY_SECRET
from mistral_deploy.skysdk import ClusterInfo, LaunchResult, ReplicaInfo, ServiceInfo, Tunnel


# --------------------------------------------------------------------------------------------------
# The VM's gateway


def self_signed_cert(directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """(cert, key) like setup.sh's `openssl req -x509 ... CA:TRUE`: the certificate is its own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-vm")])
    now = dt.datetime.now(dt.timezone.utc)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class VmEndpoint:
    """A minimal stand-in for the VM's gateway + engine, on 127.0.0.1 (or another loopback address)."""

    def __init__(self, *, served_model: str, host: str = "127.0.0.1") -> None:
        self.served_model = served_model
        self.host = host
        self.keys: set[str] = set()  # the SHA-256 of each key, as the gateway holds them
        self.ready = True
        self.requests: list[tuple[str, str, Optional[str]]] = []  # (method, path, authorization)
        self.cert_file: Optional[Path] = None
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def cert_pem(self) -> str:
        assert self.cert_file is not None
        return self.cert_file.read_text()

    def start(self, *, tls_dir: Optional[Path] = None, cert_key: Optional[tuple[Path, Path]] = None) -> "VmEndpoint":
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization")
                endpoint.requests.append((self.command, self.path, auth))
                if auth is None or not auth.startswith("Bearer "):
                    return False
                try:
                    return key_hash(auth[7:]) in endpoint.keys
                except ValueError:
                    return False

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/health":
                    endpoint.requests.append(("GET", "/health", None))
                    self._send(200 if endpoint.ready else 503, {})
                elif self.path == "/v1/models":
                    if not self._authorized():
                        self._send(401, {"error": {"message": "missing or invalid API key"}})
                    elif not endpoint.ready:
                        self._send(503, {"error": {"message": "the engine is not ready"}})
                    else:
                        self._send(200, {"object": "list", "data": [{"id": endpoint.served_model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path not in ("/v1/completions", "/v1/chat/completions"):
                    self._send(404, {"error": {"message": "not found"}})
                elif not self._authorized():
                    self._send(401, {"error": {"message": "missing or invalid API key"}})
                elif not endpoint.ready:
                    self._send(503, {"error": {"message": "the engine is not ready"}})
                elif body.get("model") != endpoint.served_model:
                    self._send(404, {"error": {"message": f"model {body.get('model')!r} does not exist"}})
                elif self.path == "/v1/completions":
                    self._send(200, {"id": "cmpl-1", "object": "text_completion", "model": endpoint.served_model,
                                     "choices": [{"index": 0, "text": " pong", "finish_reason": "length"}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
                else:
                    self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "model": endpoint.served_model,
                                     "choices": [{"index": 0, "finish_reason": "length",
                                                  "message": {"role": "assistant", "content": "pong"}}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        server = ThreadingHTTPServer((self.host, 0), Handler)
        server.daemon_threads = True
        if tls_dir is not None or cert_key is not None:
            cert, key = cert_key or self_signed_cert(tls_dir, [self.host, "localhost"])  # type: ignore[arg-type]
            self.cert_file = cert
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(cert), str(key))
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# --------------------------------------------------------------------------------------------------
# An SSH tunnel stand-in: a TCP relay from a local port to the "VM"


class RelayTunnel(Tunnel):
    """What `ssh -N -L` does for `tunnel`: bytes from 127.0.0.1:local_port to the VM's gateway."""

    def __init__(self, target: tuple[str, int], local_port: int = 0) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", local_port))
        self._listener.listen(16)
        self._listener.settimeout(0.05)  # accept() wakes up to see close()
        super().__init__(int(self._listener.getsockname()[1]), None)
        self._target = target
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def alive(self) -> bool:
        return not self._closed.is_set()

    def wait(self) -> int:
        self._closed.wait()
        return 0

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._thread.join(timeout=5)
            self._listener.close()


# --------------------------------------------------------------------------------------------------
# The SDK boundary


@dataclass
class Call:
    method: str
    args: dict[str, Any] = field(default_factory=dict)


class FakeSky:
    """SkySdk's interface over a pretend cloud; the VM's gateway is a VmEndpoint."""

    def __init__(self, vm: VmEndpoint, *, cloud: str = "aws", region: str = "us-east-1",
                 instance_type: str = "g5.xlarge") -> None:
        self.vm = vm
        self.cloud, self.region, self.instance_type = cloud, region, instance_type
        self.calls: list[Call] = []
        self.clusters: dict[str, ClusterInfo] = {}
        self.services: dict[str, ServiceInfo] = {}
        self.tasks: dict[str, Any] = {}  # name -> the sky.Task SkyPilot built from what we passed
        self.launch_lines = ["Considered resources (1 node):", "Launching on AWS us-east-1 (us-east-1a)",
                             "Cluster launched: md-x.", "Job submitted, ID: 1"]
        self.job_lines = ["mistral-deploy: phase image-pull", "v0.32.0: Pulling from vllm/vllm-openai",
                          "mistral-deploy: phase engine-start", "mistral-deploy: phase weights",
                          "INFO Loading weights took 12.3 seconds", "INFO Application startup complete."]
        self.job_ends = False  # True: the job's log ends (the run script exited: the engine died)
        self.job_log_breaks = False  # True: following the job's log fails (e.g. the API server restarted)
        self.launch_raises: Optional[Callable[[], None]] = None  # runs inside the SDK's error translation
        self.controller_host: Optional[str] = None  # SkyServe controller already up at this address
        self.serve_host = "127.0.0.1"
        self.consolidation_mode = False  # SkyServe's controller inside the API server (local unless api_host)
        self.api_host: Optional[str] = None
        # how the next `sky serve update` rolls out: "done" (the new version serves alone), "rolling" (new
        # replicas starting, the old ones serving), "failed" (the new replicas failed, the old ones serve)
        self.update_outcome = "done"
        self.status_unreadable = 0  # serve_status fails this many more times (as SkyServe's does mid-rollout)
        self.down_lingers = 0  # after serve_down, serve_status lists it SHUTTING_DOWN this many times
        self.price = 1.006
        self.down_fails: dict[str, str] = {}  # cluster -> why SkyPilot cannot remove it (yet)
        self.gpus_offered: Optional[dict[str, dict[str, list[int]]]] = None  # cloud -> GPU -> counts
        self.tunnels: list[Tunnel] = []
        self._real = skysdk.SkySdk()
        self._vms: dict[str, VmEndpoint] = {}
        self._jobs = 0

    def names(self) -> list[str]:
        return [c.method for c in self.calls]

    def _record(self, method: str, **args: Any) -> None:
        self.calls.append(Call(method, args))

    def _configure_keys(self, secrets: dict[str, str]) -> None:
        # the VM's run script turns the key hashes secret into the gateway's key map
        self.vm.keys = {entry.split(":", 1)[1] for entry in secrets[KEY_HASHES_SECRET].split()}

    # clusters
    def launch(self, task_config: dict[str, Any], *, cluster_name: str, secrets: dict[str, str],
               global_config: dict[str, Any], on_line: Callable[[str], None]) -> LaunchResult:
        task = self._real.make_task(task_config, secrets)  # SkyPilot's own validation
        self._record("launch", task_config=task_config, cluster_name=cluster_name, secrets=dict(secrets),
                     global_config=global_config)
        self.tasks[cluster_name] = task
        before = self.clusters.get(cluster_name)  # a launch on a cluster that exists
        self.clusters[cluster_name] = ClusterInfo(name=cluster_name, status="INIT")
        for line in self.launch_lines:
            on_line(line)
        if self.launch_raises is not None:
            with skysdk.translate_errors("launch"):
                self.launch_raises()
        self._configure_keys(secrets)
        spot = any(r.use_spot for r in task.resources)
        # as sky/execution.py sets it: the task's autostop; `autostop: false` cancels it; none on a cluster
        # that exists keeps the cluster's previous one (SkyPilot sets it again from its record)
        autostop = next((r.autostop_config for r in task.resources if r.autostop_config is not None), None)
        if autostop is not None:
            minutes, down = (autostop.idle_minutes, autostop.down) if autostop.enabled else (-1, False)
        elif before is not None:
            minutes, down = before.autostop_minutes, before.autodown
        else:
            minutes, down = -1, False
        info = ClusterInfo(
            name=cluster_name, status="UP", head_ip=self.vm.host, internal_ip=self.vm.host, cloud=self.cloud,
            region=self.region, zone=f"{self.region}a", instance_type=self.instance_type, use_spot=spot,
            accelerators="{'A10G': 1}", autostop_minutes=minutes, autodown=down,
        )
        self.clusters[cluster_name] = info
        self._jobs += 1
        return LaunchResult(job_id=self._jobs, cluster=info)

    def cancel_job(self, cluster_name: str, job_id: Optional[int]) -> None:
        self._record("cancel_job", cluster_name=cluster_name, job_id=job_id)

    def autostop(self, cluster_name: str, minutes: Optional[int]) -> None:
        self._record("autostop", cluster_name=cluster_name, minutes=minutes)
        import dataclasses

        self.clusters[cluster_name] = dataclasses.replace(self.clusters[cluster_name], autostop_minutes=minutes or -1,
                                                          autodown=minutes is not None)

    def run_on_head(self, cluster_name: str, script: str, *, timeout: float = 300.0) -> str:
        """What SSH would run on the VM: the script must be valid bash; the gateway's new key map (hashes,
        between the heredoc markers) is what the VM's gateway accepts from then on."""
        import subprocess

        self._record("run_on_head", cluster_name=cluster_name, script=script)
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
        if "MISTRAL_DEPLOY_KEYS_MAP" in script:
            block = script.split("<<'MISTRAL_DEPLOY_KEYS_MAP'\n", 1)[1].split("MISTRAL_DEPLOY_KEYS_MAP", 1)[0]
            self.vm.keys = {line.split('"')[1] for line in block.splitlines() if line.strip()}
        return "mistral-deploy: gateway reloaded\n"

    def cluster(self, cluster_name: str, *, refresh: bool = False) -> Optional[ClusterInfo]:
        self._record("cluster", cluster_name=cluster_name, refresh=refresh)
        return self.clusters.get(cluster_name)

    def endpoint(self, cluster_name: str, port: int) -> str:
        self._record("endpoint", cluster_name=cluster_name, port=port)
        if cluster_name not in self.clusters:
            raise skysdk.CloudError(f"no cluster {cluster_name}")
        return f"{self.vm.host}:{self.vm.port}"

    def down(self, cluster_name: str) -> None:
        self._record("down", cluster_name=cluster_name)
        if cluster_name in self.down_fails:
            raise skysdk.CloudError(self.down_fails[cluster_name])
        self.clusters.pop(cluster_name, None)

    def tail_job(self, cluster_name: str, job_id: Optional[int], *, follow: bool, lines: int = 0,
                 stop: Optional[threading.Event] = None) -> Iterator[str]:
        self._record("tail_job", cluster_name=cluster_name, job_id=job_id, follow=follow, lines=lines)
        if self.job_log_breaks:
            raise skysdk.CloudError("logs: cannot use the SkyPilot API server (connection refused)")
        out = self.job_lines[-lines:] if lines else self.job_lines
        yield from out
        if follow and not self.job_ends:
            # a serving job runs until the cluster goes: block like SkyPilot's stream, until told to stop
            (stop or threading.Event()).wait(timeout=120)

    def job_finished(self, cluster_name: str, job_id: Optional[int]) -> bool:
        self._record("job_finished", cluster_name=cluster_name, job_id=job_id)
        return self.job_ends

    def read_head_file(self, cluster_name: str, path: str) -> str:
        self._record("read_head_file", cluster_name=cluster_name, path=path)
        return self.vm.cert_pem

    def write_head_file(self, cluster_name: str, path: str, data: str, *, node: int = 0) -> None:
        self._record("write_head_file", cluster_name=cluster_name, path=path, data=data, node=node)

    def open_tunnel(self, cluster_name: str, *, remote_host: str, remote_port: int, local_port: int = 0,
                    timeout: float = 60.0) -> Tunnel:
        self._record("open_tunnel", cluster_name=cluster_name, remote_host=remote_host, remote_port=remote_port,
                     local_port=local_port)
        tunnel = RelayTunnel((self.vm.host, self.vm.port), local_port)
        self.tunnels.append(tunnel)
        return tunnel

    def unsupported_features(self, cloud: str, features: list[str]) -> dict[str, str]:
        return self._real.unsupported_features(cloud, features)  # SkyPilot's own (static) answer

    def offered_gpus(self, cloud: str) -> Optional[dict[str, list[int]]]:
        self._record("offered_gpus", cloud=cloud)
        return self.gpus_offered.get(cloud) if self.gpus_offered is not None else None

    def hourly_price(self, cluster: ClusterInfo) -> Optional[float]:
        self._record("hourly_price", instance_type=cluster.instance_type, use_spot=cluster.use_spot)
        return self.price

    # SkyServe
    def serve_up(self, task_config: dict[str, Any], *, service_name: str, secrets: dict[str, str],
                 global_config: dict[str, Any], on_line: Callable[[str], None]) -> str:
        task = self._real.make_task(task_config, secrets)
        self._record("serve_up", task_config=task_config, service_name=service_name, secrets=dict(secrets),
                     global_config=global_config)
        self.tasks[service_name] = task
        self._configure_keys(secrets)
        tls = task.service.tls_credential
        scheme = "https" if tls else "http"
        if tls is not None:
            # the load balancer serves what SkyServe uploaded: the key and certificate files we passed
            self.vm.stop()
            self.vm.start(cert_key=(Path(tls.certfile), Path(tls.keyfile)))
        if self.consolidation_mode:
            host = "localhost"  # what SkyServe reports in consolidation mode (sky/serve/server/impl.py)
        else:
            host = self.controller_host or self.serve_host
            self.controller_host = host
        endpoint = f"{scheme}://{host}:{self.vm.port}"
        self.services[service_name] = ServiceInfo(
            # SkyServe's state for a service scaled to zero is NO_REPLICA
            name=service_name, status="READY" if task.service.min_replicas else "NO_REPLICA", endpoint=endpoint,
            replicas=tuple(ReplicaInfo(replica_id=i + 1, status="READY", endpoint=f"http://10.0.0.{i + 1}:8443",
                                       cluster=f"{service_name}-{i + 1}", version=1)
                           for i in range(task.service.min_replicas)),
            version=1,
        )
        return endpoint

    def serve_consolidation_mode(self) -> bool:
        return self.consolidation_mode

    def api_server_host(self) -> Optional[str]:
        return self.api_host

    def serve_update(self, task_config: dict[str, Any], *, service_name: str, secrets: dict[str, str],
                     global_config: dict[str, Any], blue_green: bool = False) -> None:
        self._real.make_task(task_config, secrets)
        self._record("serve_update", task_config=task_config, service_name=service_name, secrets=dict(secrets),
                     blue_green=blue_green)
        import dataclasses

        service = self.services[service_name]
        version = (service.version or 1) + 1
        old = [r for r in service.replicas if r.status == "READY"]
        next_id = max([r.replica_id for r in service.replicas] or [0]) + 1
        state = {"done": "READY", "rolling": "STARTING", "failed": "FAILED_PROBING"}[self.update_outcome]
        new = [ReplicaInfo(replica_id=next_id + i, status=state, endpoint=f"http://10.0.1.{i + 1}:8443",
                           cluster=f"{service_name}-{next_id + i}", version=version) for i in range(len(old) or 1)]
        replicas = new if self.update_outcome == "done" else old + new
        self.services[service_name] = dataclasses.replace(service, replicas=tuple(replicas), version=version)
        if self.update_outcome == "done":
            self._configure_keys(secrets)  # every replica replaced

    def finish_rollout(self, service_name: str, secrets: dict[str, str], *, draining: bool = False) -> None:
        """What SkyServe does when a rolling update ends: the new replicas ready, the old ones gone (or,
        `draining`, SHUTTING_DOWN: SkyServe drains a replica it scales down for 2 minutes first). The load
        balancer (the VM stand-in) serves the new version's keys either way."""
        import dataclasses

        service = self.services[service_name]
        new = [dataclasses.replace(r, status="READY") for r in service.replicas if r.version == service.version]
        old = [dataclasses.replace(r, status="SHUTTING_DOWN") for r in service.replicas
               if r.version != service.version] if draining else []
        self.services[service_name] = dataclasses.replace(service, replicas=tuple(old + new))
        self._configure_keys(secrets)

    def serve_status(self, service_name: str) -> Optional[ServiceInfo]:
        self._record("serve_status", service_name=service_name)
        if self.status_unreadable:
            self.status_unreadable -= 1
            raise skysdk.CloudError("serve status: SkyPilot failed: Failed to fetch services")
        service = self.services.get(service_name)
        if service is not None and service.status == "SHUTTING_DOWN":
            self.down_lingers -= 1
            if self.down_lingers <= 0:
                self.services.pop(service_name)
        return self.services.get(service_name)

    def serve_down(self, service_name: str) -> None:
        self._record("serve_down", service_name=service_name)
        if self.down_lingers and service_name in self.services:
            import dataclasses

            service = self.services[service_name]
            self.services[service_name] = dataclasses.replace(
                service, status="SHUTTING_DOWN",
                replicas=tuple(dataclasses.replace(r, status="SHUTTING_DOWN") for r in service.replicas))
            return
        self.services.pop(service_name, None)

    def serve_logs(self, service_name: str, *, replica_id: int, follow: bool, lines: int = 0,
                   stop: Optional[threading.Event] = None) -> Iterator[str]:
        self._record("serve_logs", service_name=service_name, replica_id=replica_id, follow=follow, lines=lines)
        yield from (self.job_lines[-lines:] if lines else self.job_lines)

    def serve_controller_host(self) -> Optional[str]:
        self._record("serve_controller_host")
        if self.controller_host is None:
            raise skysdk.CloudError("serve status: the cluster is not up")
        return self.controller_host

    def close_tunnels(self) -> None:
        for tunnel in self.tunnels:
            tunnel.close()


def probe_key_of(call: Call) -> str:
    return call.args["secrets"][PROBE_KEY_SECRET]


def skypilot_api_servers() -> set[int]:
    """PIDs of SkyPilot API servers running on this machine (`python -m sky.server.server`)."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    pids = set()
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "sky.server.server" in args:
            pids.add(int(pid))
    return pids


# --------------------------------------------------------------------------------------------------
# Fixtures (imported by the test modules that use them)

HF = "hf_test_token_not_real_0123456789"  # a gated model's token, as the user exports it


@pytest.fixture
def vm() -> Iterator[VmEndpoint]:
    endpoint = VmEndpoint(served_model="mistral-7b-instruct")
    yield endpoint
    endpoint.stop()


@pytest.fixture
def fake(vm: VmEndpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSky]:
    sky = FakeSky(vm)
    skysdk.set_sdk(sky)
    monkeypatch.setenv(HF_TOKEN_SECRET, HF)
    yield sky
    skysdk.set_sdk(None)
    sky.close_tunnels()
