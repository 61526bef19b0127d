"""`mistral-deploy run` on the test bed (tests/testbed.py) with a private endpoint: `--cloud slurm`.

A private endpoint listens on the VM's loopback only; `run` must hold an SSH tunnel open (SkyPilot's SSH
access, as `mistral-deploy tunnel` does) for the command's lifetime and hand the command that tunnel's URL.
The command is the official `openai` client through OPENAI_BASE_URL / OPENAI_API_KEY. Afterwards: no
tunnel left (no `ssh -L` process, its local port free), the cluster torn down, whatever the command's code.
One launch per case (each takes a minute or two).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from local_support import assert_gone, port_free
from testbed import Bed, BedClient, bed_client, testbed, tiny_recipe_data  # noqa: F401  (fixtures)

pytestmark = pytest.mark.testbed

# The command: the official client lists the models and asks for one chat token; it reports what it saw
# (the key only into a file of the test's, to look for it in run's output) and which processes forward its
# port (the tunnel), and whether any process's arguments hold the key; then exits with the code it is given.
COMMAND = r"""
import json, os, sys
from openai import OpenAI
client = OpenAI(max_retries=0, timeout=60)
models = [m.id for m in client.models.list().data]
reply = client.chat.completions.create(model="tiny-mistral", max_tokens=1,
                                       messages=[{"role": "user", "content": "hello"}])
base_url = os.environ["OPENAI_BASE_URL"]
port = base_url.rsplit(":", 1)[1].split("/")[0]
key = os.environ["OPENAI_API_KEY"].encode()
with open(os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
    f.write(key)
forwarders, leaks = [], []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if key in b" ".join(argv):
        leaks.append(pid)
    if argv[0].endswith(b"ssh") and any(a.startswith(f"127.0.0.1:{port}:".encode()) for a in argv):
        forwarders.append(int(pid))
print("COMMAND-SAW " + json.dumps({"models": models, "tokens": reply.usage.completion_tokens,
                                  "base_url": base_url, "forwarders": forwarders, "leaks": leaks}), flush=True)
sys.exit(int(sys.argv[1]))
"""


def write_recipe(path: Path, name: str) -> Path:
    data = tiny_recipe_data("slurm", "private", name=name, health={"readiness_timeout": 900, "probe_interval": 1})
    path.write_text(yaml.safe_dump(data))
    return path


def ssh_forwarders(cluster: str) -> list[str]:
    """`ssh ... -L ...` processes to the cluster left on this machine."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"ssh") and b"-L" in argv and cluster.encode() in argv:
            found.append(f"{pid}: {b' '.join(argv).decode(errors='replace')[:200]}")
    return found


@pytest.mark.parametrize("wanted", [0, 3])
def test_run_holds_a_tunnel_to_a_private_endpoint_for_the_command(testbed: Bed, bed_client: BedClient,
                                                                  tmp_path: Path, wanted: int) -> None:
    name = f"bedrun{wanted}"
    recipe = write_recipe(tmp_path / "r.yaml", name)
    done = bed_client.cli("run", str(recipe), "--name", name, "--json", "--",
                          sys.executable, "-c", COMMAND, str(wanted), str(tmp_path / "key"), timeout=1200)
    said = done.stderr.split("\n--- ")[0][-4000:]  # before the API server's log, which cli() may append
    try:
        assert done.returncode == wanted, said
        summary = json.loads(done.stdout)  # --json: the command's stdout went to stderr
        seen_line = [line for line in done.stderr.splitlines() if line.startswith("COMMAND-SAW ")]
        assert seen_line, said
        seen = json.loads(seen_line[0].removeprefix("COMMAND-SAW "))
        # the command reached the endpoint through the tunnel `run` held: the official client's list and a
        # one-token chat completion
        assert seen["models"] == ["tiny-mistral"] and seen["tokens"] == 1
        assert summary["network"] == "private" and seen["base_url"] == summary["endpoint"]
        assert summary["exit_code"] == wanted and summary["teardown"] == "done"
        assert len(seen["forwarders"]) == 1, seen  # one ssh -L on the URL's port while the command ran
        assert seen["leaks"] == []  # the key in no process's arguments (SkyPilot's own included)
        key = (tmp_path / "key").read_text()
        assert key and key not in done.stdout + done.stderr  # nor in anything `run` printed

        # afterwards: the tunnel's process is gone and its port free; the cluster, its job and the record too
        port = int(seen["base_url"].rsplit(":", 1)[1].split("/")[0])
        assert_gone(seen["forwarders"], [port])
        assert port_free(port, "127.0.0.1")
        assert ssh_forwarders(f"md-{name}") == []
        assert f"md-{name}" not in bed_client.clusters()
        assert testbed.slurm_jobs() == []
        assert bed_client.cli("status", name).returncode == 5
    finally:
        testbed.clean()
