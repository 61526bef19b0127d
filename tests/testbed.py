"""The cloud test bed (scripts/testbed.sh) as the tests use it: a cloud that runs on this machine.

SkyPilot launches for real on a one-node Slurm cluster here (fake A10G:1 GPU), through SSH, as the node
user; the rendered tasks run unmodified against a real Docker daemon that pulls stand-in images from a
local registry (the engine stand-in runs the real vLLM CPU build). See scripts/testbed.sh and
docs/cloud.md.

- `testbed` (session): the bed's daemons, started if they were not running and stopped at the session's
  end if this session started them. Where the bed cannot be set up (not root, not installed) the tests
  skip with one line saying why, unless MISTRAL_DEPLOY_TESTBED_REQUIRED is set (CI), where that is a
  failure.
- `bed_client` (module): a SkyPilot client home that knows the bed (~/.slurm/config, ~/.sky/config.yaml,
  the seeded catalog), shared by a module's CLI calls so that SkyPilot's API server starts once; the
  API server is stopped at the module's end. It listens on a port of its own, free when the module
  starts (SKYPILOT_API_SERVER_LOCAL_PORT; its request queue's port follows it), not on SkyPilot's fixed
  46580/50011, which a socket of an earlier test can still hold (the server then exits at start).
- Each test that uses the bed calls `bed.clean()` at its end: no cluster, Slurm job, container or node
  process is left behind (`sky down` does not remove containers on the bed: on a cloud the VM goes with
  them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from conftest import _CLOUD_ENV_PREFIXES, REPO

SCRIPT = REPO / "scripts" / "testbed.sh"
# Read before conftest's isolation clears MISTRAL_DEPLOY_* variables.
BED_DIR = Path(os.environ.get("MISTRAL_DEPLOY_TESTBED", "/var/lib/mistral-deploy-testbed"))
REQUIRED = bool(os.environ.get("MISTRAL_DEPLOY_TESTBED_REQUIRED"))
SKY = shutil.which("sky", path=str(Path(sys.executable).parent)) or shutil.which("sky")
CLI = shutil.which("mistral-deploy", path=str(Path(sys.executable).parent)) or shutil.which("mistral-deploy")


def _bed_env() -> dict[str, str]:
    out = subprocess.run([str(SCRIPT), "env"], capture_output=True, text=True, check=True,
                         env={**os.environ, "MISTRAL_DEPLOY_TESTBED": str(BED_DIR)}).stdout
    return dict(item.split("=", 1) for item in out.split())


BED = _bed_env()


def unavailable() -> Optional[str]:
    """Why the bed cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (it runs Slurm, sshd and a Docker daemon; CI runs as root)"
    if not (BED_DIR / "installed").is_file():
        return f"not installed in {BED_DIR}: run `scripts/testbed.sh install` (as root)"
    return None


def skip_or_fail(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"cloud test bed: {reason} (MISTRAL_DEPLOY_TESTBED_REQUIRED is set)")
    pytest.skip(f"cloud test bed: {reason}")


def _script(command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), command], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MISTRAL_DEPLOY_TESTBED": str(BED_DIR)})


def tiny_recipe_data(cloud: str, mode: str, **sections: Any) -> dict[str, Any]:
    """The built-in tiny model on the bed's GPU (A10G:1), in this network mode, with its gateway on a free
    port (the bed's VMs share this machine's); `sections` update the recipe's sections."""
    import yaml

    from mistral_deploy.recipe import builtin_recipes_dir
    from mistral_deploy.skysdk import free_port

    data = yaml.safe_load((builtin_recipes_dir() / "tiny-mistral.yaml").read_text())
    data["resources"] = {"cloud": cloud, "gpu": "A10G:1", "disk_size": 64}
    data["network"] = {"mode": mode, "port": free_port()}
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


@dataclass
class Bed:
    """The bed's daemons, and what the tests ask of them."""

    dir: Path
    node_user: str = BED["NODE_USER"]
    cluster: str = BED["SLURM_CLUSTER"]
    ssh_port: int = int(BED["SSH_PORT"])
    docker_sock: str = BED["DOCKER_SOCK"]
    gpu: str = BED["GPU"]

    @property
    def docker_env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.docker_sock}"}

    def docker(self, *args: str, timeout: float = 120, check: bool = True, host: Optional[str] = None) -> str:
        """The docker CLI against the bed's daemon (or another one of the bed's, `host`)."""
        env = {**self.docker_env, "DOCKER_HOST": host} if host else self.docker_env
        done = subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr.strip()}"
        return done.stdout

    def containers(self) -> list[str]:
        """Every container on the bed's daemon (running or not), by name."""
        return [n for n in self.docker("ps", "-a", "--format", "{{.Names}}").split() if n]

    def slurm_jobs(self) -> list[str]:
        env = {**os.environ, "SLURM_CONF": str(self.dir / "slurm" / "slurm.conf")}
        out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], env=env, capture_output=True, text=True,
                             timeout=30).stdout
        return [line for line in out.splitlines() if line.strip()]

    def jobs_after(self, timeout: float = 120) -> list[str]:
        """The Slurm jobs still there once they are all gone, or `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.slurm_jobs():
            time.sleep(2)
        return self.slurm_jobs()

    def node_processes(self) -> list[str]:
        out = subprocess.run(["ps", "-u", self.node_user, "-o", "pid=,args="], capture_output=True,
                             text=True).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def clean(self) -> None:
        """What a test leaves is removed (and what it left is reported): jobs, containers, node processes."""
        env = {**os.environ, "SLURM_CONF": str(self.dir / "slurm" / "slurm.conf")}
        subprocess.run(["scancel", "-u", self.node_user], env=env, capture_output=True, timeout=30)
        boxes = self.containers()
        if boxes:
            self.docker("rm", "-f", *boxes)
        subprocess.run(["pkill", "-u", self.node_user], capture_output=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (self.slurm_jobs() or self.node_processes()):
            time.sleep(0.5)
        subprocess.run(["pkill", "-9", "-u", self.node_user], capture_output=True)
        # SkyPilot's Slurm runtime keeps each cluster's home (its Hugging Face cache...) after `down`: a
        # later test must start from nothing, as on a fresh VM
        for home in (self.dir / "home" / ".sky_clusters").glob("md-*"):
            shutil.rmtree(home, ignore_errors=True)


@dataclass
class Node:
    """One of the bed's nodes (scripts/testbed.sh start-nodes): a machine of its own as far as the network
    goes, with its own address, hostname, slurmd and Docker daemon."""

    name: str
    address: str
    docker_host: str

    @property
    def number(self) -> int:
        return int(self.name.rsplit("n", 1)[1])


def start_nodes(count: int) -> Iterator[list[Node]]:
    """Nodes 1..count of the bed's `nodes` partition, stopped with all they ran when the generator ends."""
    done = _script_args("start-nodes", str(count), timeout=300)
    try:
        assert done.returncode == 0, done.stderr[-2000:]
        yield [Node(*line.split()) for line in done.stdout.splitlines() if line.strip()]
    finally:
        _script_args("stop-nodes", timeout=300)


@pytest.fixture(scope="module")
def bed_nodes(testbed: Bed) -> Iterator[list[Node]]:
    """Four nodes in the bed's `nodes` partition (room for two replicas and two new ones while a rolling
    update replaces them), stopped with all they ran at the module's end."""
    yield from start_nodes(4)


def _script_args(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MISTRAL_DEPLOY_TESTBED": str(BED_DIR)})


@pytest.fixture(scope="session")
def testbed() -> Iterator[Bed]:
    reason = unavailable()
    if reason:
        skip_or_fail(reason)
    started = _script("status").returncode != 0
    if started:
        done = _script("start")
        if done.returncode != 0:
            _script("stop")
            pytest.fail(f"cloud test bed did not start: {done.stderr.strip()[-2000:]}")
    bed = Bed(dir=BED_DIR)
    try:
        yield bed
    finally:
        bed.clean()
        if started:
            _script("stop")


@dataclass
class BedClient:
    """A SkyPilot client (and mistral-deploy user) that knows the bed: the environment its CLIs run in."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def cli_path(self) -> str:
        assert CLI, "mistral-deploy is not installed: pip install -e '.[test]'"
        return CLI

    def cli(self, *args: str, timeout: float = 900, env: Optional[dict[str, str]] = None
            ) -> subprocess.CompletedProcess[str]:
        assert CLI, "mistral-deploy is not installed: pip install -e '.[test]'"
        done = subprocess.run([CLI, *args], env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0 and "API server" in done.stderr:
            # what SkyPilot's API server said, in the test's failure (its log is gone with the machine in CI)
            done.stderr += f"\n--- {self.server_log} (tail) ---\n{self.server_log_tail()}"
        return done

    @property
    def server_log(self) -> Path:
        return Path(self.env["SKY_RUNTIME_DIR"]) / ".sky" / "api_server" / "server.log"

    def server_log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.server_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc.strerror})"

    def sky(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        assert SKY, "SkyPilot's `sky` is not installed"
        return subprocess.run([SKY, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def record(self, name: str) -> dict[str, Any]:
        path = Path(self.env["MISTRAL_DEPLOY_HOME"]) / "deployments" / name / "deployment.json"
        return json.loads(path.read_text())

    def key(self, name: str) -> str:
        return (Path(self.env["MISTRAL_DEPLOY_HOME"]) / "deployments" / name / "api_keys").read_text().splitlines()[0].split()[-1]

    def clusters(self) -> list[str]:
        """SkyPilot's clusters, by name (`sky status`, as the user would ask)."""
        done = self.sky("status", "--refresh")
        assert done.returncode == 0, done.stderr
        names = []
        for line in done.stdout.splitlines():
            parts = line.split()
            if parts and parts[0].startswith("md-"):
                names.append(parts[0])
        return names

    def processes(self) -> list[int]:
        """This client's processes (SkyPilot's API server, its workers, SkyServe's controller and load
        balancer in consolidation mode): those whose HOME is this client's."""
        home = f"HOME={self.env['HOME']}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if home in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def stop_leftovers(self) -> None:
        """What `sky api stop` leaves of this client (its request workers can outlive it): stopped by PID."""
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.processes()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while pids and time.monotonic() < deadline:
                pids = [p for p in pids if Path(f"/proc/{p}").exists()]
                time.sleep(0.2)

    def down_all(self) -> None:
        self.cli("down", "--all", timeout=300)
        for cluster in self.clusters():
            self.sky("down", "-y", cluster)


def client_env(root: Path, bed: Bed, partition: str = "debug") -> dict[str, str]:
    """The environment of a user of the bed: what `scripts/testbed.sh client-env ROOT PARTITION` writes and
    prints (SkyPilot's Slurm config, the seeded catalog, the bed's settings), over this environment less
    any cloud credential, with an API server port of its own."""
    done = _script_args("client-env", str(root), partition, timeout=60)
    assert done.returncode == 0, done.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLOUD_ENV_PREFIXES)}
    env.update(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    env.update(SKYPILOT_API_SERVER_LOCAL_PORT=str(api_server_port()), NO_COLOR="1", CI="1", COLUMNS="120",
               PYTHONUNBUFFERED="1")
    return env


def api_server_port() -> int:
    """A port for SkyPilot's API server that is free now, and whose request-queue port is free too."""
    import socket
    from unittest import mock

    from sky.server.requests.queues import mp_queue

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with mock.patch.dict(os.environ, {"SKYPILOT_API_SERVER_LOCAL_PORT": str(port)}):
            queue_port = mp_queue.get_queue_manager_port()  # SkyPilot's own rule
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", queue_port))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair for SkyPilot's API server")


@pytest.fixture(scope="module")
def bed_client(testbed: Bed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BedClient]:
    """A client whose GPU tasks run on this machine's node (the `debug` partition)."""
    yield from _client(testbed, tmp_path_factory, "debug")


@pytest.fixture(scope="module")
def nodes_client(testbed: Bed, bed_nodes: list[Node], tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[BedClient]:
    """A client whose GPU tasks run on the bed's nodes (machines of their own), SkyServe's controller in
    the API server (consolidation mode)."""
    yield from _client(testbed, tmp_path_factory, "nodes")


def _client(testbed: Bed, tmp_path_factory: pytest.TempPathFactory, partition: str) -> Iterator[BedClient]:
    root = tmp_path_factory.mktemp("bed-client")
    client = BedClient(root=root, env=client_env(root, testbed, partition))
    try:
        yield client
    finally:
        try:
            client.down_all()
        finally:
            client.sky("api", "stop")
            client.stop_leftovers()
            testbed.clean()


class BashVm:
    """A VM as the rendered scripts see it, on the bed: the node user, a home of its own, the bed's Docker
    daemon, the node's curl (its public-address lookup answered with 203.0.113.7), and the task's secrets
    in the environment, as SkyPilot exports them. The scripts run unmodified, by bash."""

    PUBLIC_IP = "203.0.113.7"  # what the node's curl answers for checkip.amazonaws.com

    def __init__(self, bed: Bed, secrets: dict[str, str], *, name: str, docker_host: Optional[str] = None) -> None:
        import secrets as random

        self.bed = bed
        self.home = bed.dir / "vm-homes" / f"{name}-{random.token_hex(3)}"
        self.home.mkdir(parents=True)
        subprocess.run(["chown", "-R", f"{bed.node_user}:{bed.node_user}", str(self.home.parent)], check=True)
        self.env = {
            "HOME": str(self.home), "USER": bed.node_user, "LOGNAME": bed.node_user,
            "PATH": f"{bed.dir / 'nodebin'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "DOCKER_HOST": docker_host or f"unix://{bed.docker_sock}", "SKYPILOT_NUM_GPUS_PER_NODE": "1",
            **secrets,
        }
        self.run_process: Optional[subprocess.Popen[str]] = None
        self.run_output: list[str] = []

    @property
    def md_dir(self) -> Path:
        return self.home / ".mistral-deploy"

    def _argv(self, script: str) -> list[str]:
        # runuser keeps the environment given here (the secrets among it): nothing secret in an argument
        return ["runuser", "--preserve-environment", "-u", self.bed.node_user, "--", "bash", "-c", script]

    def setup(self, script: str, timeout: float = 600) -> str:
        done = subprocess.run(self._argv(script), env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=self.home)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done.stdout + done.stderr

    def start(self, script: str) -> None:
        """The run script, as the job runs it: in the background, its output collected."""
        self.run_process = subprocess.Popen(self._argv(script), env=self.env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, cwd=self.home,
                                            start_new_session=True)
        proc = self.run_process

        def collect() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.run_output.append(line.rstrip("\n"))

        import threading

        threading.Thread(target=collect, daemon=True).start()

    def cancel(self, timeout: float = 60) -> int:
        """What cancelling the job does: SIGTERM to the run script's process group; its exit status."""
        import signal

        assert self.run_process is not None
        os.killpg(self.run_process.pid, signal.SIGTERM)
        return self.run_process.wait(timeout=timeout)

    def close(self) -> None:
        import signal

        if self.run_process is not None and self.run_process.poll() is None:
            os.killpg(self.run_process.pid, signal.SIGKILL)
            self.run_process.wait(timeout=30)
        shutil.rmtree(self.home, ignore_errors=True)
