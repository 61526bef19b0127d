"""The hardening that needs no running stack: recipe `limits:` and cautions, what the gateway's config and
key map hold, the engine's arguments, and certificates that can vouch for their endpoint only."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from _cli import run_cli
from mistral_deploy.errors import RecipeError
from mistral_deploy.gateway import GatewayLayout, hashes_for, render_gateway_config, render_keys_map
from mistral_deploy.keys import generate_tls
from mistral_deploy.render import engine_args, render_task
from mistral_deploy.recipe import validate_recipe_data

KEY = "md-" + "a" * 43


def _recipe(**sections):
    data = {"name": "hard", "model": {"id": "mistralai/Mistral-7B-Instruct-v0.3"},
            "resources": {"cloud": "aws", "gpu": "A10G"}, **sections}
    return validate_recipe_data(data, "test").recipe


def _write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "hard", "model": {"id": "mistralai/Mistral-7B-Instruct-v0.3"},
                                    "resources": {"cloud": "aws", "gpu": "A10G"}, **data}))
    return str(path)


@pytest.mark.parametrize("limits, field", [
    ({"max_n": 0}, "limits.max_n"),
    ({"requests_per_minute": -5}, "limits.requests_per_minute"),
    ({"header_timeout": "forever"}, "limits.header_timeout"),
    ({"max_conections": 5}, "limits.max_conections"),
])
def test_bad_limits_are_one_line_naming_the_field(tmp_path, limits, field):
    result = run_cli("validate", _write(tmp_path, {"limits": limits}))
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in result.output


def test_vpc_requires_keys_and_says_when_tls_is_off(tmp_path):
    refused = run_cli("validate", _write(tmp_path, {"network": {"mode": "vpc"}, "auth": {"enabled": False}}),
                      "--cloud", "gcp")
    assert refused.exit_code == 3 and "auth.enabled: a vpc endpoint must require API keys" in refused.stderr
    said = run_cli("validate", _write(tmp_path, {"network": {"mode": "vpc"}}), "--cloud", "gcp")
    assert said.exit_code == 0 and "keys and prompts cross the VPC in clear" in said.stderr
    quiet = run_cli("validate", _write(tmp_path, {"network": {"mode": "vpc", "tls": True}}), "--cloud", "gcp")
    assert quiet.exit_code == 0 and "in clear" not in quiet.stderr


def test_the_gateway_config_holds_the_limits_and_no_key(tmp_path):
    recipe = _recipe(limits={"connections_per_address": 7, "requests_per_minute": 90, "concurrent_requests": 5,
                             "max_connections": 3000, "header_timeout": "4s"})
    layout = GatewayLayout(listen_host="0.0.0.0", port=8443, engine_socket="/run/x/engine.sock",
                           keys_file="/k.map", js_file="/g.js", pid_file="/p", error_log="/e", access_log="/a",
                           temp_dir="/tmp", tls_cert="/c", tls_key="/k", max_open_files=4000)
    config = render_gateway_config(recipe, layout)
    assert "limit_conn md_per_address 7;" in config and "rate=90r/m" in config and "limit_conn md_per_key 5;" in config
    # the file-descriptor limit bounds worker_connections: 2 per proxied connection, plus a margin
    assert "worker_connections 1968;" in config and "worker_rlimit_nofile 4000;" in config
    assert "client_header_timeout 4s;" in config and "server unix:/run/x/engine.sock" in config
    assert "Retry-After" in config and "js_content mdgw.checkBody;" in config
    key_map = render_keys_map(hashes_for([KEY]))
    assert key_map == f'"{hashlib.sha256(KEY.encode()).hexdigest()}" key-1;\n' and KEY not in key_map
    with pytest.raises(ValueError):
        render_keys_map({"bad id;": "0" * 64})
    with pytest.raises(ValueError):
        render_keys_map({"key-1": "not-a-hash"})


def test_the_engine_serves_on_its_socket_with_the_output_cap_merged_into_the_recipes_config():
    recipe = _recipe(model={"id": "mistralai/Mistral-7B-Instruct-v0.3",
                            "vllm_args": ["--override-generation-config", '{"temperature": 0.2, "max_new_tokens": 9000}']},
                     limits={"max_tokens": 1000})
    args = engine_args(recipe, model="m", socket="/s/engine.sock")
    assert args[args.index("--uds") + 1] == "/s/engine.sock" and "--port" not in args and "--host" not in args
    assert args.count("--override-generation-config") == 1
    config = json.loads(args[args.index("--override-generation-config") + 1])
    assert config == {"temperature": 0.2, "max_new_tokens": 1000}
    run = render_task(recipe)["run"]
    assert "--uds /run/mistral-deploy/engine.sock" in run and "-p 127" not in run and "--publish" not in run
    assert "--log-opt max-size=50m" in run and '--ulimit "nofile=$NOFILE:$NOFILE"' in run and "NOFILE=32832" in run


def test_the_engine_fetches_no_remote_media_unless_the_recipe_names_its_domains():
    """An image URL in a chat request would be fetched by the engine from inside the VM (metadata service,
    VPC): only a reserved domain that never resolves is allowed, so vLLM takes base64 data: URLs alone."""
    args = engine_args(_recipe(model={"id": "mistralai/Ministral-3-8B-Instruct-2512"}), model="m", socket="/s")
    assert args[args.index("--allowed-media-domains") + 1] == "media.invalid"
    own = engine_args(_recipe(model={"id": "m/x", "vllm_args": ["--allowed-media-domains", "images.example.com"]}),
                      model="m", socket="/s")
    assert own.count("--allowed-media-domains") == 1 and "media.invalid" not in own
    embed = engine_args(_recipe(model={"id": "m/e", "task": "embed"}), model="m", socket="/s")
    assert "--allowed-media-domains" not in embed


def test_the_vm_certificate_is_a_leaf():
    setup = render_task(_recipe(network={"mode": "public"}))["setup"]
    assert "basicConstraints=critical,CA:FALSE" in setup and "CA:TRUE" not in setup


def _forge(name: str, issuer_cert: Path, issuer_key: Path, folder: Path) -> Path:
    for argv in (["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                  "-keyout", str(folder / "f.key"), "-out", str(folder / "f.csr")],
                 ["openssl", "x509", "-req", "-in", str(folder / "f.csr"), "-CA", str(issuer_cert), "-CAkey",
                  str(issuer_key), "-CAcreateserial", "-days", "2", "-copy_extensions", "copyall",
                  "-out", str(folder / "f.pem")]):
        subprocess.run(argv, check=True, capture_output=True)
    return folder / "f.pem"


def test_the_local_ca_vouches_for_the_endpoint_only(tmp_path):
    """The CA's key is discarded and its name constraints permit the endpoint's names alone; the server's
    own key cannot sign for another name either."""
    from cryptography import x509

    files = generate_tls(tmp_path / "tls", ["127.0.0.1", "localhost"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    assert {str(n.value) for n in constraints.permitted_subtrees} == {"127.0.0.1/32", "localhost"}
    assert not list((tmp_path / "tls").glob("ca*key*"))
    verify = ["openssl", "verify", "-CAfile", str(files.ca_cert)]
    assert subprocess.run([*verify, str(files.cert)], capture_output=True).returncode == 0
    forged = _forge("pypi.org", files.cert, files.key, tmp_path)
    assert subprocess.run([*verify, "-untrusted", str(files.cert), str(forged)], capture_output=True).returncode != 0


def test_logpipe_rotates_at_line_ends_and_keeps_its_backups(tmp_path):
    import sys

    log = tmp_path / "engine.log"
    lines = [f"line {n:05d} {'x' * 40}\n".encode() for n in range(200)]  # 51 bytes each
    proc = subprocess.Popen([sys.executable, "-m", "mistral_deploy.logpipe", str(log), "1000", "2"],
                            stdin=subprocess.PIPE)
    proc.communicate(b"".join(lines), timeout=30)
    assert proc.returncode == 0
    files = [tmp_path / "engine.log.2", tmp_path / "engine.log.1", log]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.log", "engine.log.1", "engine.log.2"]
    kept = b"".join(p.read_bytes() for p in files)
    assert all(0 < p.stat().st_size <= 1000 for p in files)
    assert kept.endswith(lines[-1]) and b"".join(lines).endswith(kept)  # the newest lines, whole, in order


def test_a_recipe_may_allow_media_from_named_hosts_only():
    recipe = _recipe(model={"id": "m/x", "vllm_args": ["--allowed-media-domains", "images.example.com",
                                                      "cdn.example.org", "--max-num-seqs", "8"]})
    assert recipe.model.media_domains == ["images.example.com", "cdn.example.org"]
    with pytest.raises(RecipeError, match="--allowed-media-domains: expected host names"):
        _recipe(model={"id": "m/x", "vllm_args": ["--allowed-media-domains=evil.com;deny"]})
    run = render_task(recipe)["run"]
    assert "VLLM_MEDIA_URL_ALLOW_REDIRECTS=0" in run  # a redirect cannot leave the list
    layout = GatewayLayout(listen_host="0.0.0.0", port=8443, engine_socket="/run/x/engine.sock",
                           keys_file="/k.map", js_file="/g.js", pid_file="/p", error_log="/e", access_log="/a",
                           temp_dir="/tmp", tls_cert="/c", tls_key="/k", max_open_files=4000)
    assert 'set $md_media_domains "images.example.com cdn.example.org";' in render_gateway_config(recipe, layout)
    assert 'set $md_media_domains "";' in render_gateway_config(_recipe(), layout)
