"""`mistral-deploy run` against the local backend: the command sees the endpoint, its exit code comes back,
and the endpoint is always torn down (success, failure, SIGINT, SIGTERM), leaving no process and no port.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from local_support import CLI, assert_gone, cli, cli_env

pytestmark = pytest.mark.engine

# The command under test: reaches the endpoint with the official client, copies the deployment's record
# (PIDs, ports) where the test can read it, then exits with the code it is given or waits to be signalled.
CLIENT = r"""
import glob, json, os, shutil, sys, time
from openai import OpenAI
out = sys.argv[1]
models = [m.id for m in OpenAI(max_retries=0).models.list().data]  # OPENAI_BASE_URL / OPENAI_API_KEY
record = json.load(open(glob.glob(os.environ["MISTRAL_DEPLOY_HOME"] + "/deployments/*/deployment.json")[0]))
json.dump({"models": models, "base_url": os.environ["OPENAI_BASE_URL"], "record": record}, open(out + ".tmp", "w"))
os.replace(out + ".tmp", out)
if sys.argv[2] == "wait":
    time.sleep(120)
sys.exit(int(sys.argv[2]))
"""


def _seen(path: Path) -> dict:
    return json.loads(path.read_text())


def _gone(seen: dict) -> None:
    details = seen["record"]["details"]
    assert_gone([details["engine"]["pid"], details["gateway"]["pid"]], [details["port"]])
    assert not Path(details["engine_socket"]).exists()


def test_run_ten_cycles_passes_the_endpoint_returns_the_exit_code_and_tears_down(tmp_path, models_dir):
    env = cli_env(tmp_path, models_dir)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    names = set()
    for cycle in range(10):
        seen_file = tmp_path / f"seen-{cycle}.json"
        wanted = cycle % 3  # 0: success, 1 and 2: the command failed
        result = cli("run", "tiny-mistral", "--cloud", "local", "--json", "--",
                     sys.executable, str(script), str(seen_file), str(wanted), env=env)
        assert result.returncode == wanted, result.stderr[-2000:]
        summary = json.loads(result.stdout)
        assert summary["exit_code"] == wanted and summary["teardown"] == "done"
        seen = _seen(seen_file)
        assert seen["models"] == ["tiny-mistral"] and seen["base_url"] == summary["endpoint"]
        names.add(summary["name"])
        _gone(seen)
        assert list((tmp_path / "state" / "deployments").iterdir()) == []
    assert len(names) == 10  # each run gets a fresh name: parallel CI jobs do not collide


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_tears_down_when_signalled_while_the_command_runs(tmp_path, models_dir, sig):
    env = cli_env(tmp_path, models_dir)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    seen_file = tmp_path / "seen.json"
    proc = subprocess.Popen([CLI, "run", "tiny-mistral", "--cloud", "local", "--",
                             sys.executable, str(script), str(seen_file), "wait"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not seen_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seen_file.exists(), proc.stderr.read() if proc.poll() is not None else "the command never ran"
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.terminate()  # run tears down on SIGTERM
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        cli("down", "--all", env=env, timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]  # the command's own code: ended by the signal
    assert "stopped and removed" in err
    _gone(_seen(seen_file))
    assert list((tmp_path / "state" / "deployments").iterdir()) == []


def test_run_interrupted_while_coming_up_leaves_nothing(tmp_path, models_dir):
    env = cli_env(tmp_path, models_dir)
    proc = subprocess.Popen([CLI, "run", "tiny-mistral", "--cloud", "local", "--", "true"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deployments = tmp_path / "state" / "deployments"
    record = None
    deadline = time.monotonic() + 120
    while record is None and time.monotonic() < deadline:
        found = list(deployments.glob("*/deployment.json")) if deployments.exists() else []
        if found:
            data = json.loads(found[0].read_text())
            if (data["details"].get("gateway") or {}).get("pid"):
                record = data
        time.sleep(0.05)
    assert record, "run never started the engine and gateway"
    proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if record is None:
            cli("down", "--all", env=env, timeout=120)
    assert proc.returncode == 130, err[-2000:]
    details = record["details"]
    assert_gone([details["engine"]["pid"], details["gateway"]["pid"]], [details["port"]])
    assert not Path(details["engine_socket"]).exists()
    assert list(deployments.iterdir()) == []


def test_run_without_a_command_or_with_a_missing_one_starts_nothing(tmp_path, models_dir):
    env = cli_env(tmp_path, models_dir)
    missing = cli("run", "tiny-mistral", "--cloud", "local", "--", "no-such-command-here", env=env, timeout=60)
    assert missing.returncode == 1 and "command not found" in missing.stderr and "Traceback" not in missing.stderr
    empty = cli("run", "tiny-mistral", "--cloud", "local", env=env, timeout=60)
    assert empty.returncode != 0 and "Traceback" not in empty.stderr
    assert not (tmp_path / "state" / "deployments").exists() or not list((tmp_path / "state" / "deployments").iterdir())
