"""Shared by the benchmarks that run on the cloud test bed (scripts/testbed.sh): a SkyPilot client home that
knows the bed, the CLI run in it, and a clean-up that holds on Ctrl-C, SIGTERM or failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

_children: list[subprocess.Popen[str]] = []


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while a clean-up runs (the CLIs it starts inherit that)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _terminated(signum: int, _frame: object) -> None:
    """SIGTERM as Ctrl-C: the running CLI is told (it cleans up or records), then the clean-up runs."""
    for child in list(_children):
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
    raise KeyboardInterrupt


def run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """A command in the client's environment; interrupted, it is left to finish its own clean-up."""
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _children.append(proc)
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            with signals_ignored():
                out, err = proc.communicate(timeout=600)
            err += f"\n(stopped after {timeout:.0f}s)"
        except BaseException:
            # Ctrl-C reached it too (one process group), a SIGTERM was passed on: it cleans up or records
            with signals_ignored():
                try:
                    proc.communicate(timeout=600)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
            raise
    finally:
        _children.remove(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli(client: Any, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """mistral-deploy as the bed's user runs it."""
    return run([client.cli_path, *args], client.env, timeout)


def _nodes_running(n: int) -> bool:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return all(f"mdbed-n{i}" in names for i in range(1, n + 1))


def _bed_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    import testbed

    return subprocess.run([str(testbed.SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MISTRAL_DEPLOY_TESTBED": str(testbed.BED_DIR)})


@contextmanager
def bed_client(prog: str, nodes: int, service: str) -> Iterator[Any]:
    """A client of the bed's nodes (`scripts/testbed.sh client-env DIR nodes`, an API server port of its
    own), with `nodes` nodes running (started, and stopped at the end, if they were not). At the end, also on
    Ctrl-C, SIGTERM or failure: `mistral-deploy down SERVICE` if it exists, `sky api stop`, what is left of
    the client's processes (by PID)."""
    import testbed

    reason = testbed.unavailable()
    if reason is None and _bed_script("status", timeout=60).returncode != 0:
        reason = "not started: run `scripts/testbed.sh start` (as root)"
    if reason:
        sys.exit(f"{prog}: the cloud test bed is not usable: {reason}")
    signal.signal(signal.SIGTERM, _terminated)
    started_nodes = False
    client = None
    with tempfile.TemporaryDirectory(prefix=f"md-{prog}-") as tmp:
        root = Path(tmp)
        try:
            if not _nodes_running(nodes):
                started_nodes = True
                done = _bed_script("start-nodes", str(nodes))
                if done.returncode != 0:
                    raise SystemExit(f"{prog}: start-nodes failed: {done.stderr.strip()[-2000:]}")
            client = testbed.BedClient(root=root, env=testbed.client_env(root, testbed.Bed(dir=testbed.BED_DIR),
                                                                         "nodes"))
            yield client
        finally:
            with signals_ignored():
                _teardown(prog, client, service, started_nodes)


def _teardown(prog: str, client: Any, service: str, started_nodes: bool) -> None:
    if client is not None:
        if (Path(client.env["MISTRAL_DEPLOY_HOME"]) / "deployments" / service).exists():
            down = cli(client, "down", service, timeout=900)
            if down.returncode != 0:
                print(f"{prog}: down failed: {down.stderr.strip()[-2000:]}", file=sys.stderr)
                client.sky("serve", "down", "-y", "--all", timeout=600)
                client.down_all()
        client.sky("api", "stop")
        client.stop_leftovers()
    if started_nodes:
        done = _bed_script("stop-nodes")
        if done.returncode != 0:
            print(f"{prog}: stop-nodes failed: {done.stderr.strip()[-2000:]}", file=sys.stderr)
