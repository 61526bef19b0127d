"""What the rendered task does on a VM, where SkyPilot's Slurm infra cannot take it: the public and vpc
modes (Slurm opens no ports), run on the test bed (tests/testbed.py) by bash, unmodified, as the node user,
against the real Docker daemon and the stand-in images (the real vLLM CPU build, an nginx with the
official image's layout). Other hosts are network namespaces; clients pin the certificate the VM made.
"""

from __future__ import annotations

import json
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from local_support import Host, make_hosts, port_free
from mistral_deploy import probe
from mistral_deploy.errors import NotReadyError
from mistral_deploy.gateway import hashes_for, hashes_secret
from mistral_deploy.recipe import validate_recipe_data
from mistral_deploy.render import KEY_HASHES_SECRET, render_gateway_reload, render_task
from testbed import BashVm, Bed, testbed, tiny_recipe_data  # noqa: F401  (fixtures)

pytestmark = pytest.mark.testbed
KEYS = ["md-bedvm-first-key-0123456789abcdefghijklmn", "md-bedvm-second-key-0123456789abcdefghijkl"]
READY_WITHIN = 300.0


def tiny_recipe(mode: str, **network: Any) -> Any:
    """The tiny model on a cloud VM (aws), in this network mode."""
    data = tiny_recipe_data("aws", mode, network=network)
    if mode == "vpc":
        data["network"].setdefault("vpc_name", "bed-vpc")
    return validate_recipe_data(data, "test").recipe


@pytest.fixture
def vm(testbed: Bed, request: pytest.FixtureRequest) -> Iterator[BashVm]:
    machine = BashVm(testbed, {KEY_HASHES_SECRET: hashes_secret(hashes_for(KEYS))}, name=request.node.name[:20].lower())
    try:
        yield machine
    finally:
        machine.close()
        testbed.clean()


def wait_for_line(vm: BashVm, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in vm.run_output):
            return
        assert vm.run_process is not None and vm.run_process.poll() is None, "\n".join(vm.run_output[-40:])
        time.sleep(0.5)
    pytest.fail(f"no {text!r} in the run script's output:\n" + "\n".join(vm.run_output[-40:]))


def probe_from(host: Host, endpoint: str, ca_file: str, timeout: float = 20) -> str:
    """Our readiness probe, run on another host (a network namespace): what it raised, or 'ready'."""
    code = ("import sys; from mistral_deploy import probe\n"
            "try:\n"
            f"    probe.wait_ready({endpoint!r}, {KEYS[0]!r}, 'tiny-mistral', ca_file={ca_file!r}, timeout={timeout},"
            " interval=0.5)\n"
            "    print('ready')\n"
            "except Exception as exc:\n"
            "    print(exc)\n")
    return host.run(sys.executable, "-c", code, timeout=timeout + 30).stdout.strip()


def _sign_for(name: str, issuer_cert: Path, issuer_key: Path, folder: Path) -> Path:
    """A certificate for `name` signed with the VM's key, as whoever holds that key could make one."""
    run = [["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={name}", "-keyout", str(folder / "forged.key"), "-out", str(folder / "forged.csr")],
           ["openssl", "x509", "-req", "-in", str(folder / "forged.csr"), "-CA", str(issuer_cert), "-CAkey",
            str(issuer_key), "-CAcreateserial", "-days", "10", "-out", str(folder / "forged.pem")]]
    for argv in run:
        subprocess.run(argv, check=True, capture_output=True)
    return folder / "forged.pem"


def test_public_vm_serves_over_tls_pinned_to_the_certificate_the_vm_made(vm: BashVm, testbed: Bed,
                                                                         tmp_path: Path) -> None:
    with make_hosts(2) as (allowed, refused):
        recipe = tiny_recipe("public", allow=[f"{allowed.address}/32"])
        port = recipe.network.port
        task = render_task(recipe)
        out = vm.setup(task["setup"])
        assert "mistral-deploy: phase image-pull" in out
        tls = vm.md_dir / "gateway" / "tls"
        key_file, cert_file = tls / "key.pem", tls / "cert.pem"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(vm.md_dir.stat().st_mode) == 0o700
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        sans = {str(ip) for ip in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                .value.get_values_for_type(x509.IPAddress)}
        assert {"127.0.0.1", BashVm.PUBLIC_IP, allowed.gateway_address} <= sans

        vm.start(task["run"])
        ca = str(tmp_path / "pinned.pem")
        Path(ca).write_bytes(cert_file.read_bytes())  # what `up` fetches over SSH and stores
        endpoint = f"https://127.0.0.1:{port}/v1"
        probe.wait_ready(endpoint, KEYS[0], "tiny-mistral", ca_file=ca, timeout=READY_WITHIN, interval=1)
        # hashes only, readable by the gateway's workers through gateway/ (0711); the state folder is 0700
        key_map = vm.md_dir / "gateway" / "api_keys.map"
        assert stat.S_IMODE(key_map.stat().st_mode) == 0o644
        assert stat.S_IMODE((vm.md_dir / "gateway").stat().st_mode) == 0o711
        assert stat.S_IMODE(vm.md_dir.stat().st_mode) == 0o700

        # the official client, over TLS pinned to the VM's certificate, streaming
        from openai import OpenAI

        client = OpenAI(base_url=endpoint, api_key=KEYS[1], http_client=httpx.Client(verify=ssl.create_default_context(
            cafile=ca), trust_env=False))
        chunks = list(client.chat.completions.create(model="tiny-mistral", max_tokens=6, stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]))
        assert len(chunks) >= 2
        # a client without the pinned certificate does not get through
        with pytest.raises(httpx.ConnectError):
            httpx.get(endpoint + "/models", trust_env=False)

        # other hosts: the allowed one is served over TLS (the certificate names the address it reaches),
        # the other one gets 403, and our probe says so at once instead of waiting
        curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca, "-H",
                f"Authorization: Bearer {KEYS[0]}"]
        assert allowed.run(*curl, f"https://{allowed.gateway_address}:{port}/v1/models").stdout == "200"
        assert refused.run(*curl, f"https://{refused.gateway_address}:{port}/v1/models").stdout == "403"
        started = time.monotonic()
        said = probe_from(refused, f"https://{refused.gateway_address}:{port}/v1", ca, timeout=120)
        assert said.startswith("the gateway refused this machine's address (403)"), said
        assert time.monotonic() - started < 60  # refused at once, not after the 120 s wait
        assert probe_from(allowed, f"https://{allowed.gateway_address}:{port}/v1", ca) == "ready"

    # the engine publishes no port: it serves on a socket whose folder only root and the gateway's
    # workers (gid 101) may open
    inspected = json.loads(testbed.docker("inspect", "md-engine"))[0]
    assert not inspected["HostConfig"]["PortBindings"] and not inspected["NetworkSettings"]["Ports"]
    socket_dir = vm.md_dir / "engine"
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o2750 and socket_dir.stat().st_gid == 101
    assert stat.S_ISSOCK((socket_dir / "engine.sock").stat().st_mode)
    assert stat.S_IMODE((socket_dir / "engine.sock").stat().st_mode) == 0o770

    # the VM's certificate is a leaf: what its key signs for another name is refused, even by a bundle
    # that holds the system's CAs and this certificate (what `env` gives a shell)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(ssl.get_default_verify_paths().openssl_cafile).read_bytes() + cert_file.read_bytes())
    forged = _sign_for("pypi.org", cert_file, key_file, tmp_path)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(bundle), str(forged)], capture_output=True, text=True)
    assert verify.returncode != 0 and "pypi.org" not in verify.stdout.replace("CN = pypi.org", "")
    assert subprocess.run(["openssl", "verify", "-CAfile", str(bundle), str(cert_file)]).returncode == 0

    # secrets: by environment only, never in a container's command line or a process's arguments
    inspected = json.loads(testbed.docker("inspect", "md-engine", "md-gateway"))
    for box in inspected:
        assert not any(k in json.dumps(box["Args"]) + box["Path"] for k in KEYS)
    assert not any(k in "\n".join(vm.run_output) for k in KEYS)

    # cancelling the job removes both containers
    assert vm.cancel() != 0
    assert testbed.containers() == []
    assert port_free(port)


def test_vpc_vm_binds_the_private_address_and_admits_the_private_ranges(vm: BashVm, testbed: Bed) -> None:
    private_ip = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]
    recipe = tiny_recipe("vpc")
    assert recipe.network.allow[:3] == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
    port = recipe.network.port
    task = render_task(recipe)
    vm.setup(task["setup"])
    vm.start(task["run"])
    endpoint = f"http://{private_ip}:{port}/v1"
    # this machine reaches its own private address from that address: admitted only if it is in a private
    # range, refused with 403 otherwise (the bed's machine may be either)
    try:
        probe.wait_ready(endpoint, KEYS[0], "tiny-mistral", timeout=READY_WITHIN, interval=1)
        admitted = True
    except NotReadyError as exc:
        assert "403" in exc.message
        admitted = False
    import ipaddress

    assert admitted == any(ipaddress.ip_address(private_ip) in ipaddress.ip_network(c) for c in recipe.network.allow)
    assert port_free(port, "127.0.0.1"), "vpc mode: nothing listens on loopback"
    assert vm.cancel() != 0 and testbed.containers() == []


def test_run_refuses_to_start_without_the_keys(vm: BashVm, testbed: Bed) -> None:
    task = render_task(tiny_recipe("private"))
    vm.setup(task["setup"])
    del vm.env[KEY_HASHES_SECRET]
    vm.start(task["run"])
    assert vm.run_process is not None and vm.run_process.wait(timeout=60) != 0
    time.sleep(0.5)
    assert any("MISTRAL_DEPLOY_KEY_HASHES" in line for line in vm.run_output), vm.run_output
    assert testbed.containers() == []


def test_private_vm_gateway_is_loopback_only_and_a_dying_engine_ends_the_job(vm: BashVm, testbed: Bed) -> None:
    recipe = tiny_recipe("private")
    port = recipe.network.port
    task = render_task(recipe)
    vm.setup(task["setup"])
    assert not (vm.md_dir / "gateway" / "tls" / "key.pem").exists()
    vm.start(task["run"])
    probe.wait_ready(f"http://127.0.0.1:{port}/v1", KEYS[0], "tiny-mistral", timeout=READY_WITHIN, interval=1)
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert [line.split()[3] for line in listening.splitlines()] == [f"127.0.0.1:{port}"]
    # the engine dies (an OOM kill, a crash): the job ends with the reason, and the gateway is stopped
    testbed.docker("kill", "md-engine")
    assert vm.run_process is not None and vm.run_process.wait(timeout=60) == 1
    time.sleep(0.5)
    assert vm.run_output[-1].startswith("mistral-deploy: failed: the engine container stopped (exited, exit code 137)")
    assert testbed.docker("inspect", "-f", "{{.State.Running}}", "md-gateway").strip() == "false"


def test_containers_stop_when_the_run_script_dies_without_its_trap(vm: BashVm, testbed: Bed) -> None:
    """The run script killed outright (SIGKILL: no trap runs), as when its job step is ended under it: both
    containers stop on their own (they watch the script's lifeline), the port is free, and the script's log
    followers, which do not hold the lifeline, end with the containers."""
    import psutil

    recipe = tiny_recipe("private")
    port = recipe.network.port
    task = render_task(recipe)
    vm.setup(task["setup"])
    vm.start(task["run"])
    probe.wait_ready(f"http://127.0.0.1:{port}/v1", KEYS[0], "tiny-mistral", timeout=READY_WITHIN, interval=1)
    # a gateway reload still completes: the lifeline's watcher is a child of nginx's master, not a worker
    reloaded = vm.setup(render_gateway_reload(recipe, config=True), timeout=120)
    assert "mistral-deploy: gateway reloaded" in reloaded
    probe.wait_ready(f"http://127.0.0.1:{port}/v1", KEYS[0], "tiny-mistral", timeout=60, interval=1)
    assert vm.run_process is not None
    runuser = psutil.Process(vm.run_process.pid)
    script = next(p for p in runuser.children() if p.name() == "bash")  # the script's shell, not its subshells
    followers = [p for p in script.children(recursive=True) if p.name() == "docker"]
    assert len(followers) == 2, [p.cmdline() for p in followers]  # `docker logs -f` for each container
    script.kill()
    assert vm.run_process.wait(timeout=30) != 0

    def running() -> list[str]:
        return [n for n in testbed.docker("ps", "--format", "{{.Names}}").split() if n]

    deadline = time.monotonic() + 60
    while running() and time.monotonic() < deadline:
        time.sleep(1)
    assert running() == [], "the containers outlived the run script"
    states = {box: testbed.docker("inspect", "-f", "{{.State.Status}}", box).strip() for box in ("md-engine", "md-gateway")}
    assert states == {"md-engine": "exited", "md-gateway": "exited"}
    assert port_free(port)
    alive = psutil.wait_procs(followers, timeout=30)[1]
    assert alive == [], "a log follower outlived its container"  # (the fixture's clean-up ends any)


def test_docker_through_sudo_keeps_the_engine_environment(testbed: Bed) -> None:
    """Where the VM's user needs sudo for docker, the run script's `sudo --preserve-env=...` keeps what the
    engine container is given by name: the recipe's engine variables and the Hugging Face token."""
    import re
    import shlex

    data = tiny_recipe_data("aws", "private", model={"hf_token": True},
                            engine={"env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "MD_SUDO_CHECK": "kept"}})
    run = render_task(validate_recipe_data(data, "test").recipe)["run"]
    line = next(line for line in run.splitlines() if line.startswith('DOCKER="docker"'))
    sudo = shlex.split(re.search(r'DOCKER="(sudo [^"]+) docker"', line).group(1))
    env = {"PATH": "/usr/bin:/bin", "HF_TOKEN": "hf_sudo_check_0123456789", "MD_SUDO_CHECK": "kept",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "MD_NOT_NAMED": "dropped"}
    seen = subprocess.run([*sudo, "env"], env=env, capture_output=True, text=True, timeout=30)  # real sudo
    assert seen.returncode == 0, seen.stderr
    lines = set(seen.stdout.splitlines())
    assert {"HF_TOKEN=hf_sudo_check_0123456789", "MD_SUDO_CHECK=kept", "VLLM_ENABLE_V1_MULTIPROCESSING=0"} <= lines
    assert "MD_NOT_NAMED=dropped" not in lines  # sudo keeps only what is named


def test_tensor_parallelism_follows_the_gpus_skypilot_gave(vm: BashVm, testbed: Bed) -> None:
    """One recipe, GPU candidates of different counts: the engine is told to use what the VM has."""
    data = tiny_recipe_data("aws", "private", resources={"gpu": ["A10G:1", "L40S:2"]})
    task = render_task(validate_recipe_data(data, "test").recipe)
    assert "--tensor-parallel-size" not in task["run"].split("TP_ARGS")[0]  # not fixed at render time
    vm.setup(task["setup"])
    vm.env["SKYPILOT_NUM_GPUS_PER_NODE"] = "2"  # what SkyPilot exports on a VM with two GPUs
    vm.start(task["run"])
    wait_for_line(vm, "mistral-deploy: phase engine-start")
    deadline = time.monotonic() + 60
    while "md-engine" not in testbed.containers():
        assert time.monotonic() < deadline, vm.run_output[-20:]
        time.sleep(0.5)
    args = json.loads(testbed.docker("inspect", "-f", "{{json .Args}}", "md-engine"))
    # a shell that makes the socket's folder the gateway's, then execs the image's own `vllm serve` with
    # the arguments that follow ($0, then the model first)
    assert args[0] == "-c" and args[1].endswith('exec vllm serve "$@"')
    assert args[2:4] == ["vllm-serve", "/models/tiny-mistral"]
    assert args[-2:] == ["--tensor-parallel-size", "2"]
    vm.cancel()
    assert testbed.containers() == []
