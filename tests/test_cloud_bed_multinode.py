"""A model across two machines, for real, on the test bed's nodes: `mistral-deploy up` of a recipe with
`resources.num_nodes: 2`, launched by SkyPilot onto two of the bed's nodes (each a machine of its own: its
address, hostname, slurmd and Docker daemon).

The rendered task runs unmodified on both: the real vLLM CPU build in vLLM's multiprocessing multi-node mode
(pipeline parallelism 2: the head's engine holds the first layer, the worker's the second, joined over
torch.distributed/Gloo on the nodes' addresses SkyPilot gives), the gateway on the head alone. The only
stand-ins are the bed's: the GPU (a Slurm gres with no device) and a cloud firewall.

The tests share one deployment, in order: up, the endpoint, down.
"""

from __future__ import annotations

import re
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from testbed import Bed, BedClient, Node, nodes_client, start_nodes, testbed, tiny_recipe_data  # noqa: F401

pytestmark = pytest.mark.testbed
NAME = "mn"


@pytest.fixture(scope="module")
def bed_nodes(testbed: Bed) -> Iterator[list[Node]]:  # noqa: F811  (two nodes are enough here)
    yield from start_nodes(2)


def docker_on(node: Node, *args: str) -> str:
    done = subprocess.run(["docker", *args], env={"DOCKER_HOST": node.docker_host, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def running(node: Node) -> list[str]:
    return sorted(docker_on(node, "ps", "--format", "{{.Names}}").split())


@pytest.fixture(scope="module")
def deployment(nodes_client: BedClient, bed_nodes: list[Node], tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("mn")
    data = tiny_recipe_data("slurm", "public", name=NAME, health={"readiness_timeout": 900})
    data["resources"]["num_nodes"] = 2
    # vLLM 0.32's CPU worker allocates a pipeline stage's intermediate tensors in its warm-up, which eager
    # mode skips (cpu_worker._should_warm_up_model, cpu_model_runner.warming_up_model): a later stage then
    # fails its first step (AssertionError in sync_and_gather_intermediate_tensors). Its default compiled
    # mode warms up, through torch's inductor, which needs a C++ compiler the bed's engine image has not
    # (InvalidCxxCompiler). Traced once by Dynamo, run eagerly: warmed up, nothing to compile.
    args = [a for a in data["model"]["vllm_args"] if a != "--enforce-eager"]
    data["model"]["vllm_args"] = args + ["--compilation-config", '{"mode":2,"backend":"eager"}']
    data["network"]["port"] = 8080  # the head is a node of its own
    recipe = root / "mn.yaml"
    recipe.write_text(yaml.safe_dump(data))
    started = time.monotonic()
    done = nodes_client.cli("up", str(recipe), timeout=1500)
    state: dict[str, Any] = {"up": done, "up_seconds": time.monotonic() - started, "nodes": bed_nodes}
    try:
        yield state
    finally:
        if (Path(nodes_client.env["MISTRAL_DEPLOY_HOME"]) / "deployments" / NAME).exists():
            nodes_client.cli("down", NAME, timeout=600)


def head_and_worker(client: BedClient, nodes: list[Node]) -> tuple[str, ssl.SSLContext, Node, Node]:
    record = client.record(NAME)
    host = re.sub(r"^https?://", "", record["endpoint"]).split(":")[0]
    head = next(n for n in nodes if n.address == host)
    worker = next(n for n in nodes if n is not head)
    return record["endpoint"], ssl.create_default_context(cafile=record["tls_ca"]), head, worker


def test_up_serves_one_engine_across_two_nodes(deployment: dict[str, Any], nodes_client: BedClient) -> None:
    done = deployment["up"]
    if done.returncode != 0:
        logs = nodes_client.cli("logs", NAME, "-n", "150", timeout=300)
        pytest.fail(f"up exited {done.returncode}:\n{done.stderr[-3000:]}\n--- the job's log ---\n"
                    f"{logs.stdout[-12000:]}{logs.stderr[-2000:]}")
    print(f"\nup of a 2-node engine: {deployment['up_seconds']:.0f} s")
    endpoint, context, head, worker = head_and_worker(nodes_client, deployment["nodes"])
    # the gateway on the head alone; an engine on each
    assert running(head) == ["md-engine", "md-gateway"]
    assert running(worker) == ["md-engine"]
    # one engine, two pipeline stages: the head's rank 0 and the worker's rank 1 meet at the head's address
    head_log, worker_log = docker_on(head, "logs", "md-engine"), docker_on(worker, "logs", "md-engine")
    assert f"world_size=2 rank=0 local_rank=0 distributed_init_method=tcp://{head.address}:29501" in head_log
    assert f"world_size=2 rank=1 local_rank=0 distributed_init_method=tcp://{head.address}:29501" in worker_log
    assert "headless multiproc executor" in worker_log
    assert "PP rank 1" in worker_log and "PP rank 0" in head_log
    # the worker listens for no client: only the head's gateway does
    assert "Starting vLLM server" not in worker_log and "Application startup complete" not in worker_log

    from openai import OpenAI
    import httpx

    key = nodes_client.key(NAME)
    with httpx.Client(verify=context, timeout=120) as http:
        client = OpenAI(base_url=endpoint, api_key=key, http_client=http)
        chat = client.chat.completions.create(model="tiny-mistral", max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "hello across nodes"}])
        assert chat.choices[0].message.content
        assert chat.usage is not None and chat.usage.completion_tokens > 0
        # no key, no answer: the head's gateway is in front of the whole engine
        assert http.get(f"{endpoint}/models").status_code == 401
    status = nodes_client.cli("status", NAME, timeout=300)
    assert status.returncode == 0 and "ready" in status.stdout.lower(), status.stdout + status.stderr


def test_down_stops_the_engine_on_every_node(deployment: dict[str, Any], nodes_client: BedClient,
                                             testbed: Bed) -> None:
    done = nodes_client.cli("down", NAME, timeout=600)
    assert done.returncode == 0, done.stderr
    assert testbed.jobs_after(120) == []
    assert [c for c in nodes_client.clusters() if c.startswith("md-mn")] == []
    deadline = time.monotonic() + 60
    left = {n.name: running(n) for n in deployment["nodes"]}
    while any(left.values()) and time.monotonic() < deadline:
        time.sleep(2)
        left = {n.name: running(n) for n in deployment["nodes"]}
    assert not any(left.values()), f"containers still running after down: {left}"
