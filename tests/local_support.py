"""Helpers for the tests that run the real stack: the installed CLI in a subprocess, the real vLLM engine
(CPU build, tiny model) and the real nginx gateway, and network namespaces standing in for other hosts.

Every process a test starts is stopped by the test, and `assert_gone` checks by PID and port afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from conftest import _CLOUD_ENV_PREFIXES, ENGINE_PYTHON
from mistral_deploy.skysdk import free_port  # noqa: F401  (re-exported for the tests)

CLI = shutil.which("mistral-deploy", path=str(Path(sys.executable).parent)) or shutil.which("mistral-deploy")
UP_TIMEOUT = 600


def require_engine() -> str:
    """The engine is part of what the tests need: its absence is a failure, never a skip."""
    if not ENGINE_PYTHON or not Path(ENGINE_PYTHON).exists():
        pytest.fail("the local vLLM engine is not installed: run `mistral-deploy engine install` "
                    "(scripts/install.sh does) or set MISTRAL_DEPLOY_ENGINE_PYTHON")
    assert shutil.which("nginx") or Path("/usr/sbin/nginx").exists(), "nginx is not installed"
    return ENGINE_PYTHON


def cli_env(home: Path, models_dir: Path) -> dict[str, str]:
    """The environment of a CLI subprocess: its own state dir, no cloud credentials, no colour, CI set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLOUD_ENV_PREFIXES)}
    (home / "home").mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home / "home"), MISTRAL_DEPLOY_HOME=str(home / "state"),
               MISTRAL_DEPLOY_MODELS_DIR=str(models_dir), NO_COLOR="1", CI="1", COLUMNS="120")
    env["MISTRAL_DEPLOY_ENGINE_PYTHON"] = require_engine()
    return env


def cli(*args: str, env: dict[str, str], timeout: float = UP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    assert CLI, "mistral-deploy is not installed: pip install -e '.[test]'"
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def port_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@dataclass
class Deployed:
    """A deployment made by the CLI, as the tests see it (read from its state folder)."""

    name: str
    home: Path
    env: dict[str, str]
    endpoint: str
    key: str
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.home / "state" / "deployments" / self.name

    @property
    def port(self) -> int:
        return int(self.record["details"]["port"])

    @property
    def engine_socket(self) -> str:
        return str(self.record["details"]["engine_socket"])

    @property
    def pids(self) -> list[int]:
        d = self.record["details"]
        return [d[p]["pid"] for p in ("engine", "gateway") if d.get(p)]

    @property
    def ca(self) -> Optional[str]:
        return self.record.get("tls_ca")


def read_deployed(name: str, home: Path, env: dict[str, str]) -> Deployed:
    directory = home / "state" / "deployments" / name
    record = json.loads((directory / "deployment.json").read_text())
    key = (directory / "api_keys").read_text().splitlines()[0].split()[-1]
    return Deployed(name=name, home=home, env=env, endpoint=record["endpoint"], key=key, record=record)


def tiny_recipe(home: Path, name: str, **sections: Any) -> Path:
    """The built-in tiny-mistral recipe with `sections` set (whole top-level values), written to HOME/NAME.yaml."""
    import yaml

    from mistral_deploy.recipe import builtin_recipes_dir

    data = yaml.safe_load((builtin_recipes_dir() / "tiny-mistral.yaml").read_text())
    data.update(sections)
    path = home / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def up(name: str, home: Path, env: dict[str, str], *args: str, recipe: str = "tiny-mistral") -> Deployed:
    result = cli("up", recipe, "--cloud", "local", "--name", name, "--json", *args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["phase"] == "ready" and summary["name"] == name
    return read_deployed(name, home, env)


def down_and_assert_gone(deployed: Deployed) -> None:
    result = cli("down", deployed.name, env=deployed.env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_gone(deployed.pids, [deployed.port])
    assert not deployed.dir.exists()
    assert not Path(deployed.engine_socket).parent.exists()  # the socket's private folder is removed


def with_group_members(pids: list[int]) -> list[int]:
    """The PIDs and every live process in their process groups (the engine's EngineCore child...)."""
    found = [p for p in pids if pid_alive(p)]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) in pids and fields[0] not in ("Z", "X") and int(entry.name) not in found:
                found.append(int(entry.name))
    return found


def _socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in with_group_members(pids):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def unix_listeners(pids: list[int]) -> list[str]:
    """The paths of the Unix sockets on which these processes or their group members listen."""
    inodes = _socket_inodes(pids)
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Flags 00010000: accepting connections (listening); Inode; Path
        if len(fields) >= 8 and fields[3] == "00010000" and fields[6] in inodes:
            paths.append(fields[7])
    return paths


def tcp_listeners(pids: list[int]) -> list[str]:
    """The TCP sockets (host:port, hex as /proc shows them) on which these processes or their group
    members listen."""
    inodes = _socket_inodes(pids)
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                listening.append(fields[1])
    return listening


def assert_gone(pids: list[int], ports: list[int], timeout: float = 10.0) -> None:
    """No process left (by PID, nor in their groups) and every port free again; kills leftovers so that
    one failure does not leak into the next test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (with_group_members(pids) or not all(port_free(p) for p in ports)):
        time.sleep(0.1)
    alive = with_group_members(pids)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == [], f"processes left running: {alive}"
    assert [p for p in ports if not port_free(p)] == [], "ports still in use"


# --------------------------------------------------------------------------------------------------
# Other hosts: network namespaces joined to this one by a veth pair, addresses inside the pair only


@dataclass
class Host:
    netns: str
    address: str  # the namespace's own address
    gateway_address: str  # this machine's address on the pair, as the namespace reaches it

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def curl(self, url: str, *args: str) -> tuple[int, str]:
        """(curl's exit code, HTTP status or '000'): curl does not normalise the path (--path-as-is)."""
        out = self.run("curl", "-s", "--path-as-is", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10", *args, url)
        return out.returncode, out.stdout.strip()


def needs_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CI runs as root)")
    assert shutil.which("ip"), "iproute2 is not installed (scripts/install.sh installs it)"
    assert shutil.which("curl"), "curl is not installed (scripts/install.sh installs it)"


@contextmanager
def make_hosts(count: int) -> Iterator[list[Host]]:
    """`count` hosts, 10.231.N.2 each, reaching this machine at 10.231.N.1; removed afterwards."""
    needs_netns()
    tag = secrets.token_hex(2)
    hosts: list[Host] = []
    try:
        for n in range(count):
            ns, here, there = f"mdt-{tag}-{n}", f"mdt{tag}h{n}", f"mdt{tag}n{n}"
            subnet = 200 + (int(tag, 16) + n) % 50
            near, far = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
            for argv in (["ip", "netns", "add", ns],
                         ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
                         ["ip", "link", "set", there, "netns", ns],
                         ["ip", "addr", "add", f"{near}/24", "dev", here],
                         ["ip", "link", "set", here, "up"],
                         ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{far}/24", "dev", there],
                         ["ip", "netns", "exec", ns, "ip", "link", "set", there, "up"],
                         ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]):
                subprocess.run(argv, check=True, capture_output=True)
            hosts.append(Host(ns, far, near))
        yield hosts
    finally:
        for n in range(count):
            subprocess.run(["ip", "netns", "del", f"mdt-{tag}-{n}"], capture_output=True)
            subprocess.run(["ip", "link", "del", f"mdt{tag}h{n}"], capture_output=True)
