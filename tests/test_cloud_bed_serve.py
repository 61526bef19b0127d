"""A replicated endpoint for real, on the test bed's nodes: `mistral-deploy up` of a recipe with `replicas: 2`.

SkyPilot's own `sky serve up / update / down` run SkyServe's real controller and load balancer, in the API
server (consolidation mode: the bed has no VM for a controller). Replicas are launched by that controller
onto the bed's nodes: each a machine of its own (its address, hostname, slurmd and Docker daemon), running
the rendered replica stack unmodified (the real vLLM CPU build and the nginx gateway in containers). A node
can be lost as a VM is (`scripts/testbed.sh kill-node N`). The only stand-ins: the GPU (a Slurm gres with no
device), and a cloud firewall (the bed's SkyPilot may open ports on Slurm, whose nodes are all reachable:
scripts/testbed/sky-bed/sitecustomize.py).

The tests share one service, in order: up, the endpoint, keys, a lost replica, a rolling engine change,
down. Each later test needs the earlier ones to have passed.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from testbed import (BED, SCRIPT, BED_DIR, Bed, BedClient, Node, bed_nodes, nodes_client, testbed,  # noqa: F401
                     tiny_recipe_data)

pytestmark = pytest.mark.testbed
NAME = "svc"


def service_recipe(path: Path, **changes: Any) -> Path:
    # two keys from the start: the keys test revokes one (one rolling update; `keys add` is the same
    # update with a key more, tested against SkyServe's API in tests/test_cloud.py)
    data = tiny_recipe_data("slurm", "public", name=NAME, replicas={"min": 2}, auth={"keys": 2},
                            health={"readiness_timeout": 900, "probe_interval": 1}, **changes)
    data["network"]["port"] = 8080  # each replica on a node of its own: the same port everywhere
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def service(nodes_client: BedClient, bed_nodes: list[Node], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("svc")
    recipe = service_recipe(root / "svc.yaml")
    started = time.monotonic()
    done = nodes_client.cli("up", str(recipe), timeout=1500)
    state: dict[str, Any] = {"up": done, "up_seconds": time.monotonic() - started, "recipe": recipe,
                             "root": root, "nodes": bed_nodes}
    try:
        yield state
    finally:
        if (Path(nodes_client.env["MISTRAL_DEPLOY_HOME"]) / "deployments" / NAME).exists():
            nodes_client.cli("down", NAME, timeout=600)


def endpoint_of(client: BedClient) -> tuple[str, ssl.SSLContext]:
    record = client.record(NAME)
    return record["endpoint"], ssl.create_default_context(cafile=record["tls_ca"])


def status_of(client: BedClient) -> dict[str, Any]:
    done = client.cli("status", NAME, "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def gateway_log(node: Node) -> str:
    done = subprocess.run(["docker", "logs", "md-gateway"], env={"DOCKER_HOST": node.docker_host, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def replica_nodes(client: BedClient, nodes: list[Node]) -> dict[int, Node]:
    """READY replica id -> the node it runs on (by its endpoint's address)."""
    by_address = {node.address: node for node in nodes}
    out = {}
    for replica in status_of(client)["replicas"]:
        host = re.sub(r"^https?://", "", replica.get("endpoint") or "").split(":")[0]
        if replica["status"] == "READY" and host in by_address:
            out[replica["id"]] = by_address[host]
    return out


class Loop:
    """A steady client: one request after another through the load balancer, each result kept."""

    def __init__(self, endpoint: str, context: ssl.SSLContext, key: str) -> None:
        self.endpoint, self.context, self.key = endpoint, context, key
        self.results: list[int | str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(verify=self.context, trust_env=False, timeout=60) as http:
            while not self.stop.is_set():
                try:
                    response = http.post(self.endpoint + "/completions", headers={"Authorization": f"Bearer {self.key}"},
                                         json={"model": "tiny-mistral", "prompt": "hi", "max_tokens": 2})
                    self.results.append(response.status_code)
                except httpx.HTTPError as exc:
                    self.results.append(type(exc).__name__)
                time.sleep(0.2)

    def __enter__(self) -> "Loop":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)


def test_up_returns_once_the_load_balancer_serves(service: dict[str, Any], nodes_client: BedClient) -> None:
    done = service["up"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # the phases came from the replicas' states (SkyServe says NO_REPLICA until one is READY)
    assert re.search(r"provisioning: \d/2 replicas (pending|provisioning)", done.stderr), done.stderr
    assert re.search(r"engine-start: \d/2 replicas starting", done.stderr), done.stderr
    assert re.search(r"is ready at https://localhost:\d+/v1", done.stderr), done.stderr
    record = nodes_client.record(NAME)
    assert record["endpoint"].startswith("https://localhost:") and record["phase"] == "ready"
    # consolidation mode: replicas admit this machine's addresses (the bed's link among them), not "localhost"
    assert record["details"]["consolidation_mode"] is True
    assert f"{BED['LINK_NET']}.1" in record["details"]["lb_sources"]
    print(f"up of 2 replicas: {service['up_seconds']:.0f} s")


def test_the_official_client_through_the_load_balancer(service: dict[str, Any], nodes_client: BedClient) -> None:
    from openai import OpenAI

    endpoint, context = endpoint_of(nodes_client)
    key = nodes_client.key(NAME)
    nodes = replica_nodes(nodes_client, service["nodes"])
    deadline = time.monotonic() + 600  # `up` returns once one replica serves through the load balancer
    while len(nodes) < 2 and time.monotonic() < deadline:
        time.sleep(10)
        nodes = replica_nodes(nodes_client, service["nodes"])
    assert len(set(n.name for n in nodes.values())) == 2, nodes  # two replicas, two machines
    before = {node.name: gateway_log(node).count('"POST /v1/chat/completions') for node in nodes.values()}
    client = OpenAI(base_url=endpoint, api_key=key, http_client=httpx.Client(verify=context, trust_env=False))

    def chat() -> None:
        reply = client.chat.completions.create(model="tiny-mistral", max_tokens=3,
                                               messages=[{"role": "user", "content": "hello"}])
        assert reply.choices[0].message.content is not None

    chunks = list(client.completions.create(model="tiny-mistral", prompt="a", max_tokens=5, stream=True))
    assert len(chunks) >= 2
    # both replicas serve: SkyServe's least-load policy spreads requests in flight together (one at a time,
    # each goes to the first idle replica), and its load balancer learns of a replica READY at its next sync
    # with the controller (every 20 s): 4 at once, until both replicas' gateways logged some
    def served_now() -> dict[str, int]:
        time.sleep(1.5)  # the gateways flush their access logs once a second
        return {node.name: gateway_log(node).count('"POST /v1/chat/completions') - before[node.name]
                for node in nodes.values()}

    sent = 0
    deadline = time.monotonic() + 90
    while True:
        batch = [threading.Thread(target=chat) for _ in range(4)]
        for thread in batch:
            thread.start()
        for thread in batch:
            thread.join(timeout=120)
        sent += len(batch)
        if all(n >= 1 for n in served_now().values()) or time.monotonic() > deadline:
            break
        time.sleep(3)
    served = served_now()
    assert sum(served.values()) == sent and all(n >= 1 for n in served.values()), (sent, served)
    # the replicas' gateways still decide: no key, a wrong key, a route vLLM leaves open
    with httpx.Client(verify=context, trust_env=False) as http:
        assert http.get(endpoint + "/models").status_code == 401
        assert http.get(endpoint + "/models", headers={"Authorization": "Bearer md-wrong-0123456789abcdefghij"}
                        ).status_code == 401
        assert http.get(endpoint.removesuffix("/v1") + "/metrics",
                        headers={"Authorization": f"Bearer {key}"}).status_code == 404
    # what each replica did, read on it over SkyPilot's SSH access, and the service's total
    top = nodes_client.cli("top", NAME, "--once", "--json")
    assert top.returncode == 0, top.stderr[-2000:]
    snapshot = json.loads(top.stdout)
    assert len(snapshot["replicas"]) == 2 and all(r["engine_up"] for r in snapshot["replicas"]), snapshot
    assert snapshot["total"]["engines_up"] == 2
    rows = {r["key"]: r for r in snapshot["keys"]}
    assert rows["key-1"]["outcomes"]["2xx"] >= sent + 1 and rows["key-1"]["completion_tokens"] >= 3 * sent
    metrics = nodes_client.cli("metrics", NAME).stdout
    assert {m.group(1) for m in re.finditer(r'^vllm:generation_tokens_total\{replica="([0-9]+)"', metrics, re.M)} \
        == {l.removeprefix("replica ") for l in (r["label"] for r in snapshot["replicas"])}
    assert 'mistral_deploy_completion_tokens_total{replica="' in metrics
    # a replica admits the load balancer alone: another machine of the bed's network gets 403
    spare = next(n for n in service["nodes"] if n not in nodes.values())
    replica = next(iter(nodes.values()))
    refused = subprocess.run(["ip", "netns", "exec", f"mdbed-n{spare.number}", "curl", "-s", "-o", "/dev/null",
                              "-w", "%{http_code}", "-m", "10", f"http://{replica.address}:8080/v1/models",
                              "-H", f"Authorization: Bearer {key}"], capture_output=True, text=True, timeout=30)
    assert refused.stdout == "403", refused


def requests_with(endpoint: str, context: ssl.SSLContext, key: str, n: int = 12) -> Counter[int]:
    with httpx.Client(verify=context, trust_env=False, timeout=60) as http:
        return Counter(http.get(endpoint + "/models", headers={"Authorization": f"Bearer {key}"}).status_code
                       for _ in range(n))


def test_keys_reach_every_replica_when_the_command_returns(service: dict[str, Any], nodes_client: BedClient
                                                           ) -> None:
    endpoint, context = endpoint_of(nodes_client)
    keys = {line.split()[0]: line.split()[-1] for line in
            (Path(nodes_client.env["MISTRAL_DEPLOY_HOME"]) / "deployments" / NAME / "api_keys").read_text().splitlines()}
    assert sorted(keys) == ["key-1", "key-2"], sorted(keys)
    assert requests_with(endpoint, context, keys["key-1"]) == Counter({200: 12})
    revoked = nodes_client.cli("keys", "revoke", NAME, "key-1", timeout=1200)
    assert revoked.returncode == 0, revoked.stderr[-3000:]
    assert "serves alone" in revoked.stderr and "key-1 refused by every replica" in revoked.stderr, revoked.stderr
    # every request the load balancer spreads over the replicas: the revoked key refused, the other served
    assert requests_with(endpoint, context, keys["key-1"]) == Counter({401: 12})
    assert requests_with(endpoint, context, keys["key-2"]) == Counter({200: 12})
    listed = nodes_client.cli("keys", "list", NAME)
    assert "key-1" not in listed.stdout and "key-2" in listed.stdout


def test_a_lost_replica_is_replaced_while_clients_are_served(service: dict[str, Any], nodes_client: BedClient
                                                              ) -> None:
    endpoint, context = endpoint_of(nodes_client)
    key = nodes_client.key(NAME)
    nodes = replica_nodes(nodes_client, service["nodes"])
    lost_id, lost = sorted(nodes.items())[0]
    seen: list[dict[str, Any]] = []
    with Loop(endpoint, context, key) as loop:
        time.sleep(5)
        done = subprocess.run([str(SCRIPT), "kill-node", str(lost.number)], capture_output=True, text=True,
                              timeout=120, env={"MISTRAL_DEPLOY_TESTBED": str(BED_DIR), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            seen.append(status_of(nodes_client))
            ready = [r for r in seen[-1]["replicas"] if r["status"] == "READY" and r["id"] != lost_id]
            if len(ready) == 2:
                break
            time.sleep(10)
    answered = Counter(loop.results)
    ok = answered.get(200, 0) / max(1, len(loop.results))
    print(f"lost replica {lost_id} ({lost.name}): {len(loop.results)} requests, {ok:.4f} answered 200: {dict(answered)}")
    assert ok >= 0.99, answered
    # SkyServe replaced it, and `status` showed it while it happened
    assert len([r for r in seen[-1]["replicas"] if r["status"] == "READY"]) == 2, seen[-1]
    assert any(r["id"] > max(nodes) for r in seen[-1]["replicas"]), seen[-1]
    assert any(s.get("warning") and "SkyServe replaces them" in s["warning"]
               or any(r["status"] not in ("READY",) for r in s["replicas"]) for s in seen), seen
    subprocess.run([str(SCRIPT), "start-nodes", "4"], capture_output=True, text=True, timeout=300,
                   env={"MISTRAL_DEPLOY_TESTBED": str(BED_DIR), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def test_a_rolling_engine_change_fails_no_request(service: dict[str, Any], nodes_client: BedClient) -> None:
    endpoint, context = endpoint_of(nodes_client)
    key = nodes_client.key(NAME)
    changed = service_recipe(service["root"] / "svc.yaml")
    data = yaml.safe_load(changed.read_text())
    data["model"]["vllm_args"] = [*data["model"]["vllm_args"], "--max-num-seqs", "8"]
    changed.write_text(yaml.safe_dump(data))
    versions: set[int] = set()
    result: dict[str, Any] = {}

    def change() -> None:
        result["up"] = nodes_client.cli("up", str(changed), timeout=1500)

    with Loop(endpoint, context, key) as loop:
        thread = threading.Thread(target=change, daemon=True)
        thread.start()
        while thread.is_alive():
            row = status_of(nodes_client)
            versions |= {r["version"] for r in row["replicas"] if r["status"] == "READY"}
            time.sleep(5)
        thread.join()
    done = result["up"]
    assert done.returncode == 0, done.stderr[-3000:]
    answered = Counter(loop.results)
    print(f"rolling engine change: {len(loop.results)} requests: {dict(answered)}; READY versions seen {versions}")
    assert set(answered) == {200}, answered
    assert len(versions) >= 2, versions  # both versions' replicas served during the change
    record = nodes_client.record(NAME)
    assert "--max-num-seqs" in record["recipe"]["model"]["vllm_args"] and "rollout" not in record["details"]


def test_down_leaves_nothing_behind(service: dict[str, Any], nodes_client: BedClient, testbed: Bed) -> None:
    endpoint, _ = endpoint_of(nodes_client)
    done = nodes_client.cli("down", NAME, timeout=600)
    assert done.returncode == 0, done.stderr
    assert testbed.jobs_after(120) == []
    assert [c for c in nodes_client.clusters() if c.startswith("md-svc")] == []
    port = int(endpoint.split(":")[2].split("/")[0])
    from local_support import port_free

    assert port_free(port), "the load balancer still listens"

    def left(*flags: str) -> dict[str, list[str]]:
        found = {}
        for node in service["nodes"]:
            if Path(node.docker_host.removeprefix("unix://")).exists():
                out = subprocess.run(["docker", "ps", *flags, "--format", "{{.Names}} {{.Status}} {{.CreatedAt}}"],
                                     env={"DOCKER_HOST": node.docker_host, "PATH": "/usr/bin:/bin"},
                                     capture_output=True, text=True, timeout=60).stdout
                if out.strip():
                    found[node.name] = out.strip().splitlines()
        return found

    # No container may keep running on a node: each stops when its run script is gone (the lifeline), even
    # where the script's TERM trap did not get to remove it (seen: SkyPilot's teardown ends the job step
    # while it cleans the node). A stopped one holds nothing and the next run on that node removes it.
    deadline = time.monotonic() + 60
    running = left()
    while running and time.monotonic() < deadline:
        time.sleep(2)
        running = left()
    assert running == {}, f"containers still running on the bed's nodes after down: {running}"
    stopped = left("-a")
    if stopped:
        import warnings

        warnings.warn(f"stopped containers left after down (the run script's trap was cut short): {stopped}")
