"""`run` with a private cloud endpoint, the SDK stood in for (tests/cloud_support.py): the command gets a
tunnel of `run`'s own for its lifetime (up's is closed when up returns), on the recorded port or a free one
when that is taken; a tunnel that cannot be opened, or an endpoint that does not answer through it, is exit 8
with the endpoint torn down and the command never started. The real thing, on the bed:
tests/test_cloud_bed_run.py."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from _cli import run_cli
from cloud_support import FakeSky, VmEndpoint, fake, vm  # noqa: F401  (fixtures)
from mistral_deploy import skysdk
from mistral_deploy.cloud import CloudBackend
from mistral_deploy.recipe import Overrides, load_recipe
from mistral_deploy.state import StateStore

FAST_HEALTH = {"readiness_timeout": 30, "probe_interval": 0.05, "probe_timeout": 5}

# The command: one authenticated request through OPENAI_BASE_URL; what it saw goes to the file it is given.
COMMAND = r"""
import json, os, sys, httpx
base = os.environ["OPENAI_BASE_URL"]
answer = httpx.get(base + "/models", headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]},
                   trust_env=False, timeout=10)
json.dump({"base_url": base, "status": answer.status_code}, open(sys.argv[1], "w"))
"""


def _recipe_file(tmp_path: Path) -> str:
    data = load_recipe("mistral-7b-instruct", Overrides(cloud="aws", gpu="A10G", network="private")
                       ).recipe.to_yaml_config()
    data["health"] = dict(FAST_HEALTH)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _after_up(monkeypatch: pytest.MonkeyPatch, then: Callable[[Any], None]) -> None:
    """`then(deployment)` runs once `up` has returned (and closed its own tunnel), before the command."""
    original = CloudBackend.up

    def up(self: CloudBackend, *args: Any, **kwargs: Any) -> Any:
        deployment = original(self, *args, **kwargs)
        then(deployment)
        return deployment

    monkeypatch.setattr(CloudBackend, "up", up)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _tunnels(fake: FakeSky) -> list[int]:
    return [c.args["local_port"] for c in fake.calls if c.method == "open_tunnel"]


def test_run_holds_a_tunnel_to_a_private_endpoint_on_the_recorded_port(fake, vm, tmp_path, monkeypatch):
    vm.start()
    recorded: dict[str, Any] = {}
    _after_up(monkeypatch, lambda d: recorded.update(port=d.details["tunnel_port"], endpoint=d.endpoint,
                                                     open=[t.alive() for t in fake.tunnels]))
    seen_file = tmp_path / "seen.json"
    result = run_cli("run", _recipe_file(tmp_path), "--name", "ci", "--",
                     sys.executable, "-c", COMMAND, str(seen_file))
    assert result.exit_code == 0, result.stderr
    assert recorded["open"] == [False]  # up's own tunnel was closed: the command's is run's
    seen = json.loads(seen_file.read_text())
    assert seen == {"base_url": recorded["endpoint"], "status": 200}  # the URL `up` recorded, answering
    assert _tunnels(fake)[-1] == recorded["port"]
    assert not any(t.alive() for t in fake.tunnels)  # closed once the command ended
    assert [c.args for c in fake.calls if c.method == "down"] == [{"cluster_name": "md-ci"}]
    assert not skysdk.port_open("127.0.0.1", recorded["port"])
    assert StateStore().list() == []


def test_run_forwards_another_port_when_the_recorded_one_is_taken(fake, vm, tmp_path, monkeypatch):
    vm.start()
    holder = socket.socket()
    taken: dict[str, int] = {}

    def occupy(deployment: Any) -> None:
        taken["port"] = deployment.details["tunnel_port"]
        holder.bind(("127.0.0.1", taken["port"]))
        holder.listen()

    _after_up(monkeypatch, occupy)
    seen_file = tmp_path / "seen.json"
    try:
        result = run_cli("run", _recipe_file(tmp_path), "--name", "ci", "--",
                         sys.executable, "-c", COMMAND, str(seen_file))
    finally:
        holder.close()
    assert result.exit_code == 0, result.stderr
    seen = json.loads(seen_file.read_text())
    assert seen["status"] == 200 and _port(seen["base_url"]) != taken["port"]
    assert _port(seen["base_url"]) == _tunnels(fake)[-1]  # the tunnel's own port, handed to the command
    assert not any(t.alive() for t in fake.tunnels)


@pytest.mark.parametrize("failure", ["no-tunnel", "key-refused"])
def test_run_exits_8_and_tears_down_when_the_tunnel_fails(fake, vm, tmp_path, monkeypatch, failure):
    vm.start()
    keys: list[str] = []

    def break_it(deployment: Any) -> None:
        keys.extend(StateStore().read_api_keys(deployment.name))
        if failure == "key-refused":
            vm.keys = set()  # the gateway answers, and refuses the key: waiting changes nothing
        else:
            def refuse(*args: Any, **kwargs: Any) -> Any:
                raise skysdk.CloudError("ssh tunnel to md-ci failed: kex_exchange_identification: Connection closed")

            monkeypatch.setattr(fake, "open_tunnel", refuse)

    _after_up(monkeypatch, break_it)
    seen_file = tmp_path / "seen.json"
    result = run_cli("run", _recipe_file(tmp_path), "--name", "ci", "--", sys.executable, "-c", COMMAND,
                     str(seen_file))
    assert result.exit_code == 8, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SSH tunnel" in errors[0] and "Traceback" not in result.stderr, result.stderr
    if failure == "key-refused":
        assert "401" in errors[0]
    assert not seen_file.exists()  # the command never started
    assert keys and not any(key in result.stdout + result.stderr for key in keys)
    assert [c.args for c in fake.calls if c.method == "down"] == [{"cluster_name": "md-ci"}]
    assert not any(t.alive() for t in fake.tunnels)
    assert StateStore().list() == []
