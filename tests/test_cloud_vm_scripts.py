"""The rendered setup and run scripts, executed by bash as SkyPilot would on the VM.

No VM, GPU or Docker daemon here: `docker` and `curl` are stand-in programs on PATH that record how
they were called (`curl` answers the public-IP lookup with a documentation address, so nothing leaves
this machine). Everything else is real: bash, openssl, the files the scripts write, their modes.
What this checks is the part that is ours: secrets reach containers by environment only, never in a
process's arguments; the engine is published on 127.0.0.1 only; the TLS key is made on the VM, 0600.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mistral_deploy.recipe import Overrides, load_recipe, validate_recipe_data
from mistral_deploy.render import API_KEYS_SECRET, HF_TOKEN_SECRET, render_task

KEYS = ["md-first-key-0123456789abcdefghijklmnopqrs", "md-second-key-0123456789abcdefghijklmnopq"]
HF = "hf_secret_token_0123456789abcdefghijkl"
PUBLIC_IP = "203.0.113.7"

DOCKER = """#!/bin/sh
# records each call, one per line, arguments NUL-free and quoted
printf '%s\\n' "docker $*" >> "$MD_TEST_LOG"
env >> "$MD_TEST_ENV_LOG"
exit 0
"""
CURL = f"""#!/bin/sh
printf '%s\\n' "curl $*" >> "$MD_TEST_LOG"
echo {PUBLIC_IP}
"""


@pytest.fixture
def vm(tmp_path: Path) -> dict[str, Any]:
    home = tmp_path / "vm-home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("docker", DOCKER), ("curl", CURL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    log = tmp_path / "calls.log"
    env_log = tmp_path / "env.log"
    env = {
        "HOME": str(home),
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "MD_TEST_LOG": str(log),
        "MD_TEST_ENV_LOG": str(env_log),
        # what SkyPilot exports from the task's secrets
        API_KEYS_SECRET: " ".join(KEYS),
        HF_TOKEN_SECRET: HF,
    }
    return {"home": home, "env": env, "log": log, "env_log": env_log}


def _run(script: str, vm: dict[str, Any]) -> str:
    done = subprocess.run(["bash", "-c", script], env=vm["env"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _calls(vm: dict[str, Any]) -> list[str]:
    return vm["log"].read_text().splitlines() if vm["log"].exists() else []


def test_public_vm_scripts(vm: dict[str, Any]) -> None:
    from cryptography import x509

    task = render_task(load_recipe("mistral-7b-instruct", Overrides(cloud="aws", gpu="A10G")).recipe)
    out = _run(task["setup"], vm) + _run(task["run"], vm)
    md = vm["home"] / ".mistral-deploy"

    # TLS: made on the VM, key 0600, certificate names loopback and the public address
    key = md / "gateway" / "tls" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((md / "gateway" / "tls" / "cert.pem").read_bytes())
    sans = {str(ip) for ip in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", PUBLIC_IP} <= sans
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True

    # keys: into the gateway's 0600 map, from the environment
    key_map = md / "gateway" / "api_keys.map"
    assert stat.S_IMODE(key_map.stat().st_mode) == 0o600
    assert key_map.read_text() == "".join(f'"~^(?i:bearer) {k}$" 1;\n' for k in KEYS)
    assert "ssl_certificate" in (md / "gateway" / "nginx.conf").read_text()

    calls = _calls(vm)
    engine = next(c for c in calls if c.startswith("docker run") and "md-engine" in c)
    gateway = next(c for c in calls if c.startswith("docker run") and "md-gateway" in c)
    assert "-p 127.0.0.1:8000:8000" in engine and "--restart unless-stopped" in engine
    assert "--gpus all" in engine and "--shm-size" in engine and "--ipc=host" in engine
    assert "--env HF_TOKEN" in engine  # by name: the value comes from the environment
    assert "--network host" in gateway and "--restart unless-stopped" in gateway and ":ro" in gateway
    assert any(c.startswith("docker pull vllm/vllm-openai:v0.32.0") for c in calls)
    # no secret in any program's arguments, nor in what the scripts print
    for text in calls + [out]:
        for secret in KEYS + [HF]:
            assert secret not in text
    # ...but the container runtime got the token through its environment
    assert f"HF_TOKEN={HF}" in vm["env_log"].read_text()
    phases = [line.split("phase ", 1)[1] for line in out.splitlines() if "mistral-deploy: phase" in line]
    assert phases == ["image-pull", "engine-start", "weights"]


def test_private_vm_gateway_binds_loopback_without_tls(vm: dict[str, Any]) -> None:
    task = render_task(load_recipe("mistral-7b-instruct", Overrides(cloud="aws", gpu="A10G",
                                                                      network="private")).recipe)
    _run(task["setup"], vm)
    _run(task["run"], vm)
    md = vm["home"] / ".mistral-deploy"
    conf = (md / "gateway" / "nginx.conf").read_text()
    assert "listen 127.0.0.1:8443" in conf and "ssl" not in conf.split("listen", 1)[1].split(";", 1)[0]
    assert not (md / "gateway" / "tls" / "key.pem").exists()
    assert not any(c.startswith("curl") for c in _calls(vm))  # no public-address lookup


def test_vpc_vm_gateway_binds_the_private_address(vm: dict[str, Any]) -> None:
    task = render_task(load_recipe("mistral-7b-instruct", Overrides(cloud="aws", gpu="A10G",
                                                                      network="vpc")).recipe)
    _run(task["setup"], vm)
    _run(task["run"], vm)
    conf = (vm["home"] / ".mistral-deploy" / "gateway" / "nginx.conf").read_text()
    first_ip = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]
    assert f"listen {first_ip}:8443" in conf and "__MISTRAL_DEPLOY" not in conf


def test_service_replica_gateway_speaks_http_to_the_load_balancer(vm: dict[str, Any]) -> None:
    data = load_recipe("mistral-7b-instruct", Overrides(cloud="aws", gpu="A10G")).recipe.to_yaml_config()
    data["replicas"] = 2
    task = render_task(validate_recipe_data(data, "test").recipe)
    _run(task["setup"], vm)
    _run(task["run"], vm)
    md = vm["home"] / ".mistral-deploy"
    conf = (md / "gateway" / "nginx.conf").read_text()
    assert "ssl_certificate" not in conf and "listen 0.0.0.0:8443;" in conf
    assert not (md / "gateway" / "tls" / "key.pem").exists()


def test_run_refuses_to_start_without_the_keys(vm: dict[str, Any]) -> None:
    task = render_task(load_recipe("mistral-7b-instruct", Overrides(cloud="aws", gpu="A10G")).recipe)
    _run(task["setup"], vm)
    env = dict(vm["env"])
    del env[API_KEYS_SECRET]
    done = subprocess.run(["bash", "-c", task["run"]], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "MISTRAL_DEPLOY_API_KEYS" in done.stderr
    assert not any(c.startswith("docker run") for c in _calls(vm))


def test_scripts_leave_no_world_readable_secret(vm: dict[str, Any]) -> None:
    task = render_task(load_recipe("mistral-7b-instruct", Overrides(cloud="aws", gpu="A10G")).recipe)
    _run(task["setup"], vm)
    _run(task["run"], vm)
    md = vm["home"] / ".mistral-deploy"
    assert stat.S_IMODE(os.stat(md).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(md / "gateway").st_mode) == 0o700
