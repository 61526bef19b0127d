"""SkyServe for real where it can run here: SkyServe's own load balancer (sky.serve.load_balancer, as the
service's controller starts it) in front of two real replicas, each the rendered replica stack run by
bash, unmodified, on a VM of the test bed (its own network namespace and Docker daemon: tests/testbed.py).

Only the SkyServe controller is stood in for, at its one boundary with the load balancer: it answers
`/controller/load_balancer_sync` with the ready replicas' URLs, as sky/serve/controller.py does. The
readiness probe is sent by SkyServe's own `ReplicaInfo.probe`, with the service spec SkyPilot builds from
the rendered task and its secrets, as the controller sends it to each replica.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from local_support import assert_gone
from mistral_deploy import probe
from mistral_deploy.gateway import UPSTREAM_TIMEOUT_SECONDS, hashes_for, hashes_secret, key_hash
from mistral_deploy.keys import generate_tls
from mistral_deploy.recipe import validate_recipe_data
from mistral_deploy.render import (KEY_HASHES_SECRET, LOAD_BALANCER_ENV, PROBE_KEY_SECRET, admit_load_balancer,
                                   render_task)
from mistral_deploy.skysdk import SkySdk, free_port, port_open
from testbed import BashVm, Bed, ReplicaHost, replica_hosts, testbed, tiny_recipe_data  # noqa: F401  (fixtures)

pytestmark = pytest.mark.testbed
KEYS = ["md-serve-client-key-0123456789abcdefghijkl"]
PROBE_KEY = "md-serve-probe-key-0123456789abcdefghijklm"


class Controller:
    """The SkyServe controller's side of the load balancer's sync: the ready replicas' URLs."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.synced: list[dict[str, Any]] = []
        controller = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path != "/controller/load_balancer_sync":
                    self.send_response(404)
                    self.end_headers()
                    return
                controller.synced.append(body)
                data = json.dumps({"replica_info": {url: {"gpu_type": "A10G"} for url in controller.urls}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def requests_counted(self) -> int:
        return sum(len((s.get("request_aggregator") or {}).get("timestamps", [])) for s in self.synced)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def service(testbed: Bed, replica_hosts: list[ReplicaHost], tmp_path: Path) -> Iterator[dict[str, Any]]:
    data = tiny_recipe_data("aws", "public", replicas=2)
    recipe = validate_recipe_data(data, "test").recipe
    config = render_task(recipe)
    secrets = {KEY_HASHES_SECRET: hashes_secret({**hashes_for(KEYS), "probe": key_hash(PROBE_KEY)}),
               PROBE_KEY_SECRET: PROBE_KEY}
    admit_load_balancer(config, [load_balancer_side(host) for host in replica_hosts])  # as `up` does
    task = SkySdk().make_task(config, secrets)  # the spec SkyPilot builds, probe key filled in
    # each replica admits the load balancer alone: here it reaches replica N from this machine's side of
    # the replica's link, 10.231.15N.1 (what `up` gives as the controller's address on a cloud)
    vms = [BashVm(testbed, {**secrets, LOAD_BALANCER_ENV: load_balancer_side(host)}, name=f"replica-{host.name}",
                  docker_host=host.docker_host)
           for host in replica_hosts]
    try:
        for vm in vms:
            vm.setup(config["setup"])
            vm.start(config["run"])
        yield {"recipe": recipe, "task": task, "vms": vms, "hosts": replica_hosts}
    finally:
        for vm, host in zip(vms, replica_hosts):
            if vm.run_process is not None and vm.run_process.poll() is None:
                vm.cancel()
            assert testbed.docker("ps", "-aq", host=host.docker_host).split() == []
            vm.close()


def load_balancer_side(host: ReplicaHost) -> str:
    return host.address.rsplit(".", 1)[0] + ".1"


def replica_info(replica_id: int, url: str) -> Any:
    """SkyServe's ReplicaInfo for a replica of the bed: its URL is the bed VM's, the rest is SkyServe's."""
    from sky.serve import replica_managers

    class BedReplica(replica_managers.ReplicaInfo):
        @property
        def url(self) -> str:  # on a cloud: the cluster's opened port, from SkyPilot's record
            return url

    return BedReplica(replica_id, f"md-svc-{replica_id}", url.rsplit(":", 1)[1], is_spot=False, location=None,
                      version=1, resources_override=None)


def test_skyserve_load_balancer_in_front_of_two_real_replicas(service: dict[str, Any], tmp_path: Path) -> None:
    recipe, spec = service["recipe"], service["task"].service
    port = recipe.network.port
    urls = [f"http://{host.address}:{port}" for host in service["hosts"]]
    # the load balancer waits on a silent response as long as the gateway waits on the engine
    assert spec.lb_stream_timeout_seconds == UPSTREAM_TIMEOUT_SECONDS
    for url in urls:  # each replica: its gateway, over HTTP (TLS ends at the load balancer)
        probe.wait_ready(url + "/v1", KEYS[0], recipe.served_model_name, timeout=300, interval=1)

    # the readiness probe, as SkyServe's controller sends it: the rendered path, body and header
    for replica_id, url in enumerate(urls, 1):
        replica = replica_info(replica_id, url)
        _, ready, _ = replica.probe(spec.readiness_path, spec.post_data, spec.readiness_timeout_seconds,
                                    spec.readiness_headers)
        assert ready, url
        _, ready, _ = replica.probe(spec.readiness_path, spec.post_data, spec.readiness_timeout_seconds,
                                    {"Authorization": "Bearer md-not-a-key-0123456789abcdefgh"})
        assert not ready, "a probe without the probe key must fail (the gateway checks every request)"
    # a replica admits its load balancer's address alone: another address on the same link gets 403
    host = service["hosts"][0]
    conf = (service["vms"][0].md_dir / "gateway" / "nginx.conf").read_text()
    assert f"allow {load_balancer_side(host)};" in conf and "0.0.0.0/0" not in conf
    stranger = host.address.rsplit(".", 1)[0] + ".3"
    link = subprocess.run(["ip", "-o", "addr", "show", "to", load_balancer_side(host)], capture_output=True,
                          text=True, check=True).stdout.split()[1]
    subprocess.run(["ip", "addr", "add", f"{stranger}/32", "dev", link], check=True)
    try:
        refused = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10", "--interface",
                                  stranger, f"{urls[0]}/v1/models", "-H", f"Authorization: Bearer {KEYS[0]}"],
                                 capture_output=True, text=True)
        assert refused.stdout == "403"
    finally:
        subprocess.run(["ip", "addr", "del", f"{stranger}/32", "dev", link], check=True)
    # the probe key, which SkyServe keeps in clear in the service's spec, may ask for one token only
    probe_auth = {"Authorization": f"Bearer {PROBE_KEY}"}
    asked = {"model": recipe.served_model_name, "prompt": "hi"}
    for body, status in (({**asked, "max_tokens": 1}, 200), ({**asked, "max_tokens": 50}, 400), (asked, 400),
                         ({**asked, "max_tokens": 1, "n": 2}, 400)):
        assert httpx.post(urls[0] + "/v1/completions", json=body, headers=probe_auth).status_code == status, body

    # SkyServe's load balancer, TLS with a certificate for its address, in front of both replicas
    tls = generate_tls(tmp_path / "lb-tls", ["127.0.0.1"], common_name="svc")
    controller = Controller(urls)
    lb_port = free_port()
    code = ("from sky.serve import load_balancer, serve_utils\n"
            f"load_balancer.run_load_balancer({controller.url!r}, {lb_port}, None, "
            f"serve_utils.TLSCredential(keyfile={str(tls.key)!r}, certfile={str(tls.cert)!r}), None, "
            f"{spec.lb_stream_timeout_seconds})\n")
    lb = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (controller.synced and port_open("127.0.0.1", lb_port)):
            assert lb.poll() is None and time.monotonic() < deadline, lb.stderr.read() if lb.poll() else "no sync"
            time.sleep(0.5)
        endpoint = f"https://127.0.0.1:{lb_port}/v1"
        context = ssl.create_default_context(cafile=str(tls.ca_cert))
        probe.wait_ready(endpoint, KEYS[0], recipe.served_model_name, ca_file=str(tls.ca_cert), timeout=60)

        from openai import OpenAI

        client = OpenAI(base_url=endpoint, api_key=KEYS[0], http_client=httpx.Client(verify=context, trust_env=False))
        for _ in range(6):
            reply = client.chat.completions.create(model=recipe.served_model_name, max_tokens=4,
                                                   messages=[{"role": "user", "content": "hello"}])
            assert reply.choices[0].message.content is not None
        chunks = list(client.completions.create(model=recipe.served_model_name, prompt="a", max_tokens=5,
                                                stream=True))
        assert len(chunks) >= 2
        # the replicas' gateways still decide: no key, a wrong key, a route vLLM leaves open
        with httpx.Client(verify=context, trust_env=False) as http:
            assert http.get(endpoint + "/models").status_code == 401
            assert http.get(endpoint + "/models", headers={"Authorization": "Bearer md-wrong-0123456789abcdefghij"}
                            ).status_code == 401
            assert http.get(endpoint.removesuffix("/v1") + "/metrics",
                            headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 404
        # both replicas served (SkyServe's least-load policy spreads the requests), as their own logs say
        deadline = time.monotonic() + 10  # the gateways flush their access logs once a second
        while True:
            served = [sum(line.count('"POST /v1/chat/completions" 200') for line in list(vm.run_output))
                      for vm in service["vms"]]
            if sum(served) >= 6 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert all(n >= 1 for n in served) and sum(served) == 6, served
        deadline = time.monotonic() + 40  # the load balancer reports its requests at its next sync
        while controller.requests_counted() < 9 and time.monotonic() < deadline:
            time.sleep(1)
        assert controller.requests_counted() >= 9
    finally:
        import os
        import signal

        os.killpg(lb.pid, signal.SIGTERM)
        lb.wait(timeout=30)
        controller.stop()
    assert_gone([lb.pid], [lb_port])
